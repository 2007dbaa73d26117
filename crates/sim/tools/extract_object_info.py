#!/usr/bin/env python3
"""Dev-time helper: copy the simulator's node specs out of a captured ComfyUI object_info.json.

Usage: extract_object_info.py [CAPTURE] > ../src/data/builtin_object_info.json
The capture defaults to tests/fixtures/comfyui/api/object_info.json (ComfyUI v0.11.0, no model files).
Model-file choice lists are empty in the capture; the simulator fills them in code.
"""
import json
import os
import sys

NODES = [
    "UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "EmptyFlux2LatentImage",
    "Flux2Scheduler", "CFGGuider", "KSamplerSelect", "RandomNoise", "SamplerCustomAdvanced",
    "VAEDecode", "SaveImage", "PreviewImage", "CheckpointLoaderSimple", "LTXAVTextEncoderLoader",
    "EmptyLTXVLatentVideo", "LTXVScheduler", "LTXVConditioning", "CreateVideo", "SaveVideo",
    "LoadImage", "EmptyImage", "ImageInvert", "ImageBlur", "ImageScaleBy", "ImageScale",
    # also used by the workshop templates (crates/templates/workflows)
    "PrimitiveInt", "ConditioningZeroOut", "ManualSigmas", "LTXVAudioVAELoader",
    "LTXVEmptyLatentAudio", "LTXVConcatAVLatent", "LTXVSeparateAVLatent", "LTXVAudioVAEDecode",
    # the stock frontend's default graph and commonly taught SD nodes
    "KSampler", "EmptyLatentImage", "KSamplerAdvanced", "LoraLoader", "VAEEncode", "LatentUpscale",
    "LatentUpscaleBy", "ImageScaleToTotalPixels", "PreviewAny", "ConditioningCombine",
    "CLIPSetLastLayer",
]

src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../tests/fixtures/comfyui/api/object_info.json")
with open(src) as f:
    info = json.load(f)
missing = [n for n in NODES if n not in info]
if missing:
    sys.exit(f"missing in capture: {missing}")
out = {n: info[n] for n in NODES}
json.dump(out, sys.stdout, indent=1)
sys.stdout.write("\n")

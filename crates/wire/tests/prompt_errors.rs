//! Every case of traces/prompt_errors.txt, reproduced field by field, plus the other
//! validation rules of ComfyUI 0.11.0.

mod common;

use comfyume_wire::{
    ObjectInfo, PromptError, UserFiles, ValidPrompt, participant_view, uses_server_counter,
    validate_prompt, validate_prompt_with_files,
};
use common::*;
use serde_json::{Value, json};

fn reject(body: Value) -> PromptError {
    let err = validate_prompt(&body, object_info()).expect_err("should be rejected");
    assert_eq!(err.status(), 400);
    assert_error_shape(&err.body());
    err
}

fn accept(body: Value) -> ValidPrompt {
    validate_prompt(&body, object_info()).unwrap_or_else(|e| panic!("{}", e.body()))
}

fn empty_image(width: Value) -> Value {
    json!({"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0}})
}

fn save(from: &str) -> Value {
    json!({"class_type": "SaveImage", "inputs": {"images": [from, 0], "filename_prefix": "x"}})
}

#[test]
fn unknown_class_type() {
    let e = reject(json!({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}));
    same_json(&e.body(), &trace_body("unknown class_type"));
}

#[test]
fn missing_class_type() {
    let e = reject(json!({"prompt": {"1": {"inputs": {}}, "2": save("1")}}));
    same_json(&e.body(), &trace_body("missing class_type"));
}

#[test]
fn no_outputs() {
    let e = reject(json!({"prompt": {"1": empty_image(json!(64))}}));
    same_json(&e.body(), &trace_body("no outputs"));
}

#[test]
fn no_prompt_key() {
    let e = reject(json!({"client_id": "abc"}));
    same_json(&e.body(), &trace_body("no prompt key"));
    same_json(&reject(json!([1])).body(), &trace_body("no prompt key"));
}

#[test]
fn missing_required_input_and_out_of_range() {
    let e = reject(json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1}},
        "2": save("1")
    }}));
    same_json(
        &e.body(),
        &trace_body("missing required input + out of range"),
    );
}

#[test]
fn value_not_in_list() {
    let e = reject(json!({"prompt": {
        "1": empty_image(json!(64)),
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus",
              "width": 32, "height": 32, "crop": "disabled"}},
        "3": save("2")
    }}));
    same_json(&e.body(), &trace_body("value not in list"));
}

#[test]
fn invalid_input_type() {
    let e = reject(json!({"prompt": {"1": empty_image(json!("abc")), "2": save("1")}}));
    same_json(&e.body(), &trace_body("invalid input type"));
}

#[test]
fn bad_link() {
    let e = reject(json!({"prompt": {
        "1": empty_image(json!(64)),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}}
    }}));
    same_json(&e.body(), &trace_body("bad link"));
}

#[test]
fn return_type_mismatch() {
    let e = reject(json!({"prompt": {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": save("1")
    }}));
    same_json(&e.body(), &trace_body("return type mismatch"));
}

#[test]
fn load_image_nonexistent() {
    let e = reject(json!({"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "2": save("1")
    }}));
    same_json(&e.body(), &trace_body("LoadImage nonexistent"));
}

#[test]
fn accepted_bodies_match_the_200_traces() {
    let wf: Value = serde_json::from_str(&read("workflows/nomodel.json")).unwrap();
    let v = accept(
        json!({"prompt": wf, "prompt_id": "my-own-id-123", "number": 7.5,
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}, "front": true}),
    );
    assert!(!uses_server_counter(&json!({"number": 7.5})));
    let n = v.priority(16);
    same_json(
        &v.response(v.prompt_id.as_deref().unwrap(), &n),
        &trace_body("custom prompt_id + number + extra_data + front"),
    );

    let body = json!({"prompt": wf, "front": true});
    assert!(uses_server_counter(&body));
    let v = accept(body);
    assert_eq!(v.prompt_id, None);
    let n = v.priority(16);
    same_json(
        &v.response("5a7aa01d-0af7-48dc-96e2-05adbb3b139b", &n),
        &trace_body("front:true without number"),
    );
    // An integer `number` becomes a float, as float() makes it.
    let v = accept(json!({"prompt": wf, "number": 7}));
    assert_eq!(serde_json::to_string(&v.priority(0)).unwrap(), "7.0");
    let v = accept(json!({"prompt": wf, "number": "2.5", "prompt_id": 5}));
    assert_eq!(v.number, Some(2.5));
    assert_eq!(v.prompt_id.as_deref(), Some("5"));
}

#[test]
fn partial_execution_targets_restrict_outputs() {
    let prompt = json!({"1": empty_image(json!(64)), "2": save("1"), "3": save("1"),
        "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}});
    let v = accept(json!({"prompt": prompt, "partial_execution_targets": ["3"]}));
    assert_eq!(v.outputs_to_execute, ["3"]);
    assert!(v.node_errors.is_empty());
    let v = accept(json!({"prompt": prompt, "partial_execution_targets": null}));
    assert_eq!(v.outputs_to_execute, ["2", "3"]);
    assert_eq!(v.node_errors["4"]["dependent_outputs"], json!(["4"]));
    let e = reject(json!({"prompt": prompt, "partial_execution_targets": ["9"]}));
    assert_eq!(e.error_type(), "prompt_no_outputs");
    let e = reject(json!({"prompt": prompt, "partial_execution_targets": ["4"]}));
    assert_eq!(e.details(), "Required input is missing: filename_prefix");
    let e = reject(json!({"prompt": prompt, "partial_execution_targets": 3}));
    assert_eq!(e.error_type(), "invalid_prompt");
}

#[test]
fn value_bigger_than_max_and_float_conversion() {
    let e = reject(json!({"prompt": {"1": empty_image(json!(20000)), "2": save("1")}}));
    let err = &e.node_errors()["1"]["errors"][0];
    same_json(
        err,
        &json!({"type": "value_bigger_than_max", "message": "Value 20000 bigger than max of 16384",
            "details": "width", "extra_info": {"input_name": "width",
            "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "received_value": 20000}}),
    );
    let e = reject(json!({"prompt": {
        "1": empty_image(json!(8)),
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area", "scale_by": 0}},
        "3": save("2")
    }}));
    let err = &e.node_errors()["2"]["errors"][0];
    assert_eq!(err["message"], "Value 0.0 smaller than min of 0.01");
    assert_eq!(
        serde_json::to_string(&err["extra_info"]["received_value"]).unwrap(),
        "0.0"
    );
    assert_eq!(e.node_errors()["2"]["dependent_outputs"], json!(["3"]));
    assert_eq!(e.details(), "");
}

#[test]
fn conversions_are_written_back_like_comfyui() {
    let v = accept(json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": " 64 ", "height": 63.9, "batch_size": true,
              "color": {"__value__": "7"}}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area", "scale_by": 2}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": 12}}
    }}));
    assert_eq!(
        serde_json::to_string(&v.prompt["1"]["inputs"]).unwrap(),
        r#"{"width":64,"height":63,"batch_size":1,"color":7}"#
    );
    assert_eq!(
        serde_json::to_string(&v.prompt["2"]["inputs"]["scale_by"]).unwrap(),
        "2.0"
    );
    assert_eq!(v.prompt["3"]["inputs"]["filename_prefix"], "12");
}

#[test]
fn invalid_conversions_report_python_messages() {
    let e = reject(json!({"prompt": {"1": empty_image(json!(null)), "2": save("1")}}));
    assert_eq!(
        e.node_errors()["1"]["errors"][0]["details"],
        "width, None, int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
    );
    let e = reject(json!({"prompt": {
        "1": empty_image(json!(8)),
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "area", "scale_by": "x2"}},
        "3": save("2")
    }}));
    let err = &e.node_errors()["2"]["errors"][0];
    assert_eq!(
        err["message"],
        "Failed to convert an input value to a FLOAT value"
    );
    assert_eq!(
        err["details"],
        "scale_by, x2, could not convert string to float: 'x2'"
    );
}

#[test]
fn links_to_missing_nodes_and_slots_raise_like_python() {
    // On the output node itself: exception_during_validation.
    let e = reject(json!({"prompt": {"1": empty_image(json!(8)), "2": save("9")}}));
    same_json(
        &e.body(),
        &json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
            "details": "Exception when validating node: '9'", "extra_info": {}},
            "node_errors": {"2": {"errors": [{"type": "exception_during_validation",
                "message": "Exception when validating node", "details": "'9'",
                "extra_info": {"exception_type": "KeyError", "traceback": []}}],
                "dependent_outputs": ["2"], "class_type": "SaveImage"}}}),
    );
    // On an upstream node: caught by its consumer as exception_during_inner_validation.
    let e = reject(json!({"prompt": {
        "1": empty_image(json!(8)),
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 5]}},
        "3": save("2")
    }}));
    same_json(
        &e.node_errors()["2"],
        &json!({"errors": [{"type": "exception_during_inner_validation",
            "message": "Exception when validating inner node", "details": "tuple index out of range",
            "extra_info": {"input_name": "images", "input_config": ["IMAGE", {"tooltip": "The images to save."}],
                "exception_message": "tuple index out of range", "exception_type": "IndexError",
                "traceback": [], "linked_node": ["2", 0]}}],
            "dependent_outputs": ["3"], "class_type": "ImageInvert"}),
    );
    assert_eq!(e.details(), "");
    // A negative slot indexes from the end, as in Python.
    accept(
        json!({"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", -1]}}, "3": save("2")}}),
    );
    let e = reject(json!({"prompt": {"1": empty_image(json!(8)),
        "2": {"class_type": "SaveImage", "inputs": {"images": [1, 0], "filename_prefix": "x"}}}}));
    assert_eq!(e.node_errors()["2"]["errors"][0]["details"], "1");
    let e = reject(json!({"prompt": {"1": empty_image(json!(8)),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", "0"], "filename_prefix": "x"}}}}));
    assert_eq!(
        e.node_errors()["2"]["errors"][0]["details"],
        "tuple indices must be integers or slices, not str"
    );
}

#[test]
fn any_and_comma_types_are_accepted() {
    // PreviewAny takes "*".
    let v = accept(json!({"prompt": {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    }}));
    assert_eq!(v.outputs_to_execute, ["2"]);
    let info = ObjectInfo::from_value(json!({
        "Src": {"input": {"required": {}}, "output": ["MASK"], "output_node": false},
        "AnySrc": {"input": {"required": {}}, "output": ["*"], "output_node": false},
        "Sink": {"input": {"required": {"x": ["IMAGE, MASK"]}}, "output": [], "output_node": true}
    }))
    .unwrap();
    let body = |src: &str| json!({"prompt": {"1": {"class_type": src, "inputs": {}}, "2": {"class_type": "Sink", "inputs": {"x": ["1", 0]}}}});
    assert!(validate_prompt(&body("Src"), &info).is_ok());
    assert!(validate_prompt(&body("AnySrc"), &info).is_ok());
}

#[test]
fn upload_inputs_use_comfyui_wording_per_kind() {
    let files = UserFiles {
        outputs: Vec::new(),
        images: vec!["up.png".into(), "sub/x.png".into()],
        videos: vec!["clip.mp4".into()],
        audio: vec!["a.wav".into()],
        all: vec![
            "up.png".into(),
            "sub/x.png".into(),
            "clip.mp4".into(),
            "a.wav".into(),
        ],
    };
    let check = |node: Value, out_class: &str| {
        let body = json!({"prompt": {"1": node, "2": {"class_type": out_class, "inputs": {out_input(out_class): ["1", 0]}}}});
        validate_prompt_with_files(&body, object_info(), &files)
    };
    fn out_input(class: &str) -> &'static str {
        match class {
            "SaveVideo" => "video",
            "PreviewAudio" => "audio",
            _ => "images",
        }
    }
    let err = |r: Result<ValidPrompt, PromptError>| {
        r.unwrap_err().node_errors()["1"]["errors"][0]["details"].clone()
    };
    assert_eq!(
        err(check(
            json!({"class_type": "LoadVideo", "inputs": {"file": "nope.mp4"}}),
            "SaveVideo"
        )),
        "file - Invalid video file: nope.mp4"
    );
    assert_eq!(
        err(check(
            json!({"class_type": "LoadAudio", "inputs": {"audio": "nope.wav"}}),
            "PreviewAudio"
        )),
        "audio - Invalid audio file: nope.wav"
    );
    assert_eq!(
        err(check(
            json!({"class_type": "LoadImage", "inputs": {"image": "up.png [output]"}}),
            "PreviewImage"
        )),
        "image - Invalid image file: up.png [output]"
    );
    // Another participant's file is just as invalid.
    assert_eq!(
        err(check(
            json!({"class_type": "LoadImage", "inputs": {"image": "up (1).png"}}),
            "PreviewImage"
        )),
        "image - Invalid image file: up (1).png"
    );
    for ok in ["up.png", "sub/x.png", "up.png [input]"] {
        assert!(
            check(
                json!({"class_type": "LoadImage", "inputs": {"image": ok}}),
                "PreviewImage"
            )
            .is_ok(),
            "{ok}"
        );
    }
    assert!(
        check(
            json!({"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}}),
            "SaveVideo"
        )
        .map(|_| ())
        .map_err(|e| e.body())
        .is_err_and(|b| b["node_errors"]["2"].is_object()),
        "SaveVideo needs its other inputs"
    );
    // A linked LoadImage.image reaches VALIDATE_INPUTS as None, which ComfyUI cannot open.
    let e = validate_prompt_with_files(
        &json!({"prompt": {
            "0": {"class_type": "PrimitiveString", "inputs": {"value": "up.png"}},
            "1": {"class_type": "LoadImage", "inputs": {"image": ["0", 0]}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
        }}),
        object_info(),
        &files,
    )
    .unwrap_err();
    assert_eq!(
        e.node_errors()["1"]["errors"][0]["type"],
        "exception_during_inner_validation"
    );
    assert_eq!(
        e.node_errors()["1"]["errors"][0]["details"],
        "'NoneType' object has no attribute 'endswith'"
    );
}

#[test]
fn with_files_equals_validating_against_the_participant_view() {
    let files = UserFiles {
        outputs: Vec::new(),
        images: vec!["mine.png".into()],
        videos: vec![],
        audio: vec![],
        all: vec!["mine.png".into()],
    };
    let view = ObjectInfo::from_value(participant_view(object_info_value(), &files)).unwrap();
    for image in ["mine.png", "up.png", "nope.png", "mine.png [input]"] {
        for class in ["LoadImage", "LoadImageMask"] {
            let mut node =
                json!({"class_type": class, "inputs": {"image": image, "channel": "alpha"}});
            if class == "LoadImage" {
                node["inputs"].as_object_mut().unwrap().remove("channel");
            }
            let out = if class == "LoadImage" {
                "PreviewImage"
            } else {
                "MaskPreview"
            };
            let input = if class == "LoadImage" {
                "images"
            } else {
                "mask"
            };
            let body = json!({"prompt": {"1": node, "2": {"class_type": out, "inputs": {input: ["1", 0]}}}});
            let a = validate_prompt_with_files(&body, object_info(), &files).map_err(|e| e.body());
            let b = validate_prompt(&body, &view).map_err(|e| e.body());
            assert_eq!(a, b, "{class} {image}");
        }
    }
    // Load3D has no custom validator: its list is checked as a combo, with the participant's
    // list in input_config (never the shared server's).
    let body = json!({"prompt": {"1": {"class_type": "Load3D", "inputs": {"model_file": "3d/other.glb",
        "image": {}, "width": 64, "height": 64}}, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}});
    let a = validate_prompt_with_files(&body, object_info(), &files).unwrap_err();
    let b = validate_prompt(&body, &view).unwrap_err();
    assert_eq!(a.body(), b.body());
    assert_eq!(
        a.node_errors()["1"]["errors"][0]["details"],
        "model_file: '3d/other.glb' not in []"
    );
}

#[test]
fn node_errors_on_success_and_dependent_outputs_quirk() {
    let v = accept(json!({"prompt": {
        "1": empty_image(json!(64)),
        "2": save("1"),
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}}
    }}));
    assert_eq!(v.outputs_to_execute, ["2"]);
    // ComfyUI appends each failing output to every node that has errors so far.
    assert_eq!(v.node_errors["3"]["dependent_outputs"], json!(["3", "4"]));
    assert_eq!(v.node_errors["5"]["dependent_outputs"], json!(["4"]));
    assert_error_shape(
        &json!({"error": {"type": "", "message": "", "details": "", "extra_info": {}}, "node_errors": v.node_errors}),
    );
}

#[test]
fn dependency_cycles_are_reported_not_recursed() {
    let e = reject(json!({"prompt": {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": save("1")
    }}));
    let err = &e.node_errors()["1"]["errors"][0];
    assert_eq!(err["type"], "dependency_cycle");
    assert_eq!(
        err["details"],
        "1 (ImageInvert) -> 2 (ImageInvert) -> 1 (ImageInvert)"
    );
    assert_eq!(
        e.node_errors()["2"]["errors"][0]["extra_info"]["cycle_nodes"],
        json!(["1", "2"])
    );
}

#[test]
fn deep_chains_do_not_overflow() {
    let mut prompt = serde_json::Map::new();
    prompt.insert("0".into(), empty_image(json!(8)));
    for i in 1..10_000 {
        prompt.insert(
            i.to_string(),
            json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}),
        );
    }
    prompt.insert("out".into(), save("9999"));
    let v = accept(json!({"prompt": prompt}));
    assert_eq!(v.outputs_to_execute, ["out"]);
}

#[test]
fn dynamic_v3_inputs_expand_like_comfyui() {
    let batch = |inputs: Value| {
        json!({"prompt": {
            "1": empty_image(json!(8)),
            "2": {"class_type": "BatchImagesNode", "inputs": inputs},
            "3": save("2")
        }})
    };
    accept(batch(
        json!({"images.image0": ["1", 0], "images.image1": ["1", 0], "images.image2": ["1", 0]}),
    ));
    let e = reject(batch(json!({"images.image0": ["1", 0]})));
    same_json(
        &e.node_errors()["2"]["errors"],
        &json!([{"type": "required_input_missing", "message": "Required input is missing",
            "details": "image1", "extra_info": {"input_name": "images.image1"}}]),
    );
    // A DynamicCombo reveals the selected option's inputs under "<combo>.<input>".
    let resize = |inputs: Value| {
        json!({"prompt": {
            "1": empty_image(json!(8)),
            "2": {"class_type": "ResizeImageMaskNode", "inputs": inputs},
            "3": save("2")
        }})
    };
    let base = json!({"input": ["1", 0], "resize_type": "scale dimensions", "resize_type.width": 32,
        "resize_type.height": 32, "resize_type.crop": "center", "scale_method": "area"});
    accept(resize(base.clone()));
    let mut bad = base;
    bad["resize_type.width"] = json!(-1);
    let e = reject(resize(bad));
    assert_eq!(
        e.node_errors()["2"]["errors"][0]["type"],
        "value_smaller_than_min"
    );
    assert_eq!(
        e.node_errors()["2"]["errors"][0]["details"],
        "resize_type.width"
    );
}

#[test]
fn extra_data_client_id_and_sensitive_keys() {
    let wf: Value = serde_json::from_str(&read("workflows/nomodel.json")).unwrap();
    let mut v = accept(json!({"prompt": wf, "client_id": "sock-1", "extra_data": {
        "auth_token_comfy_org": "t", "api_key_comfy_org": "k", "extra_pnginfo": {"workflow": {"id": "w"}}}}));
    assert_eq!(v.client_id.as_deref(), Some("sock-1"));
    assert_eq!(
        serde_json::to_string(&v.extra_data).unwrap(),
        r#"{"extra_pnginfo":{"workflow":{"id":"w"}},"client_id":"sock-1"}"#
    );
    assert_eq!(
        Value::Object(v.sensitive.clone()),
        json!({"auth_token_comfy_org": "t", "api_key_comfy_org": "k"})
    );
    v.stamp_create_time(1795781617536);
    assert_eq!(v.extra_data["create_time"], 1795781617536u64);
    let e = reject(json!({"prompt": wf, "extra_data": [1]}));
    assert_eq!(e.error_type(), "invalid_prompt");
    let e = reject(json!({"prompt": wf, "number": "soon"}));
    assert_eq!(e.details(), "could not convert string to float: 'soon'");
}

#[test]
fn garbage_prompts_get_comfyui_shaped_errors() {
    for prompt in [json!([]), json!("")] {
        assert_eq!(
            reject(json!({"prompt": prompt})).error_type(),
            "prompt_no_outputs"
        );
    }
    for prompt in [json!(null), json!(3), json!(["1"]), json!("abc")] {
        assert_eq!(
            reject(json!({"prompt": prompt})).error_type(),
            "invalid_prompt"
        );
    }
    let e = reject(json!({"prompt": {"1": "class_type"}}));
    assert_eq!(
        e.message(),
        "Cannot execute because a node is missing the class_type property."
    );
    let e = reject(json!({"prompt": {"1": {"class_type": 5}}}));
    assert_eq!(e.message(), "Cannot execute because node 5 does not exist.");
    let e = reject(json!({"prompt": {"1": {"class_type": "SaveImage"}}}));
    assert_eq!(e.node_errors()["1"]["errors"][0]["details"], "'inputs'");
    let e = reject(json!({"prompt": {"1": {"class_type": "SaveImage", "inputs": 3}}}));
    assert_eq!(
        e.node_errors()["1"]["errors"][0]["details"],
        "argument of type 'int' is not iterable"
    );
}

#[test]
fn rejected_is_a_toastable_comfyui_error() {
    let e = PromptError::rejected(
        "queue_full",
        "Your queue is full",
        "At most 3 pending prompts",
    );
    assert_eq!(e.status(), 400);
    assert_error_shape(&e.body());
    same_json(
        &e.body(),
        &json!({"error": {"type": "queue_full", "message": "Your queue is full",
            "details": "At most 3 pending prompts", "extra_info": {}}, "node_errors": {}}),
    );
}

#[test]
fn shared_workflows_validate() {
    for name in ["nomodel.json", "runtime_error.json", "slow_blur.json"] {
        let wf: Value = serde_json::from_str(&read(&format!("workflows/{name}"))).unwrap();
        let v = accept(json!({"prompt": wf.clone(), "client_id": "c"}));
        assert_eq!(
            v.prompt, wf,
            "{name}: already-typed values stay as they are"
        );
        assert_eq!(v.outputs_to_execute.len(), 1, "{name}");
    }
}

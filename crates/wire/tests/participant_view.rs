//! The per-participant `/object_info`: only the participant's files, both list forms,
//! everything else untouched.

mod common;

use comfyume_wire::{FileKind, ObjectInfo, UserFiles, ViewTemplate, participant_view};
use common::*;
use serde_json::{Value, json};

fn alice() -> UserFiles {
    UserFiles {
        outputs: Vec::new(),
        images: vec!["zeta.png".into(), "alice.png".into(), "sub/cat.webp".into()],
        videos: vec!["walk.mp4".into()],
        audio: vec!["song.flac".into()],
        all: vec![
            "alice.png".into(),
            "zeta.png".into(),
            "sub/cat.webp".into(),
            "walk.mp4".into(),
            "song.flac".into(),
            "3d/teapot.glb".into(),
            "notes.txt".into(),
            "saved.latent".into(),
        ],
    }
}

fn bob() -> UserFiles {
    UserFiles {
        images: vec!["bob.png".into()],
        all: vec!["bob.png".into()],
        ..UserFiles::default()
    }
}

#[test]
fn file_inputs_list_only_the_participants_files_in_both_forms() {
    let base = object_info_value();
    let view = participant_view(base, &alice());
    // Old list form: [[choices...], {opts}].
    assert_eq!(
        view["LoadImage"]["input"]["required"]["image"],
        json!([["alice.png", "sub/cat.webp", "zeta.png"], {"image_upload": true}])
    );
    assert_eq!(
        view["LoadImageMask"]["input"]["required"]["image"][0],
        json!(["alice.png", "sub/cat.webp", "zeta.png"])
    );
    // The mask channel is not a file input.
    assert_eq!(
        view["LoadImageMask"]["input"]["required"]["channel"],
        base["LoadImageMask"]["input"]["required"]["channel"]
    );
    // v3 form: ["COMBO", {"options": [...]}], other options kept in place.
    assert_eq!(
        view["LoadVideo"]["input"]["required"]["file"],
        json!(["COMBO", {"multiselect": false, "options": ["walk.mp4"], "video_upload": true}])
    );
    assert_eq!(
        serde_json::to_string(&view["LoadAudio"]["input"]["required"]["audio"]).unwrap(),
        r#"["COMBO",{"multiselect":false,"options":["song.flac"],"audio_upload":true}]"#
    );
    assert_eq!(
        view["Load3D"]["input"]["required"]["model_file"][1]["options"],
        json!(["3d/teapot.glb"])
    );
    assert_eq!(
        view["LoadLatent"]["input"]["required"]["latent"][0],
        json!(["saved.latent"])
    );
    // A remote combo has no list to patch: the frontend fetches it.
    assert_eq!(view["LoadImageOutput"], base["LoadImageOutput"]);

    // Nobody else's files: none of the base server's uploads, none of Bob's.
    let text = view.to_string();
    for foreign in ["up (1).png", "clipspace-mask.png", "bob.png"] {
        assert!(!text.contains(foreign), "{foreign} leaked");
    }
    let bobs = participant_view(base, &bob());
    assert_eq!(
        bobs["LoadImage"]["input"]["required"]["image"][0],
        json!(["bob.png"])
    );
    assert_eq!(
        bobs["LoadVideo"]["input"]["required"]["file"][1]["options"],
        json!([])
    );
    assert!(!bobs.to_string().contains("alice.png"));
}

#[test]
fn untouched_nodes_are_identical_and_order_is_kept() {
    let base = object_info_value();
    let view = participant_view(base, &alice());
    let (b, v) = (base.as_object().unwrap(), view.as_object().unwrap());
    assert_eq!(b.keys().collect::<Vec<_>>(), v.keys().collect::<Vec<_>>());
    let changed: Vec<&str> = b
        .iter()
        .filter(|(k, node)| v[k.as_str()] != **node)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        changed,
        [
            "LoadImage",
            "LoadImageMask",
            "LoadLatent",
            "LoadAudio",
            "Load3D",
            "LoadVideo"
        ]
    );
    for class in [
        "EmptyImage",
        "KSampler",
        "SaveImage",
        "CheckpointLoaderSimple",
    ] {
        assert_eq!(
            serde_json::to_string(&v[class]).unwrap(),
            serde_json::to_string(&b[class]).unwrap()
        );
    }
}

#[test]
fn template_renders_the_same_bytes() {
    let info = object_info();
    let template = ViewTemplate::new(info);
    assert_eq!(
        template.patched_classes().collect::<Vec<_>>(),
        [
            "LoadImage",
            "LoadImageMask",
            "LoadLatent",
            "LoadAudio",
            "Load3D",
            "LoadVideo"
        ]
    );
    for files in [alice(), bob(), UserFiles::default()] {
        let want = serde_json::to_string(&participant_view(object_info_value(), &files)).unwrap();
        assert_eq!(template.render(&files), want);
    }
    // The rendered body parses back to the same document.
    let parsed: Value = serde_json::from_str(&template.render(&alice())).unwrap();
    assert_eq!(parsed, participant_view(object_info_value(), &alice()));
}

#[test]
fn single_class_view_and_typed_spec() {
    let info = object_info();
    let node = info.participant_node("LoadImage", &alice()).unwrap();
    assert_eq!(
        node["input"]["required"]["image"][0],
        json!(["alice.png", "sub/cat.webp", "zeta.png"])
    );
    let same = info.participant_node("EmptyImage", &alice()).unwrap();
    assert!(matches!(same, std::borrow::Cow::Borrowed(_)));
    assert!(info.participant_node("Nope", &alice()).is_none());
    let view = ObjectInfo::from_value(participant_view(object_info_value(), &alice())).unwrap();
    let spec = view.input_spec("LoadVideo", "file").unwrap();
    assert_eq!(spec.upload, Some(FileKind::Video));
    assert!(
        matches!(spec.kind, comfyume_wire::InputKind::Combo { ref choices, .. } if choices == &[json!("walk.mp4")])
    );
}

#[test]
fn real_object_info_specs() {
    let info = object_info();
    assert_eq!(info.len(), 592);
    let width = info.input_spec("EmptyImage", "width").unwrap();
    assert!(
        matches!(width.kind, comfyume_wire::InputKind::Int(ref n) if n.min == Some(1.0) && n.max == Some(16384.0))
    );
    let sampler = info.input_spec("KSampler", "sampler_name").unwrap();
    assert!(
        matches!(sampler.kind, comfyume_wire::InputKind::Combo { ref choices, .. } if choices.len() == 44)
    );
    let hidden = info.input_spec("SaveImage", "prompt").unwrap();
    assert_eq!(
        hidden.kind,
        comfyume_wire::InputKind::Hidden("PROMPT".into())
    );
    assert!(info.is_output_node("SaveImage") && !info.is_output_node("EmptyImage"));
    assert_eq!(info.output_types("LoadImage"), ["IMAGE", "MASK"]);
    assert!(ObjectInfo::from_value(json!([])).is_err());
}

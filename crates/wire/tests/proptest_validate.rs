//! Random and garbled input never panics the validator (or the frame/query parsers), and
//! every rejection has ComfyUI's error shape.

mod common;

use comfyume_wire::shapes::{BinaryFrame, JobsQuery};
use comfyume_wire::{UserFiles, ValidPrompt, validate_prompt, validate_prompt_with_files};
use common::*;
use proptest::prelude::*;
use serde_json::{Map, Number, Value, json};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,6}".prop_map(Value::String),
        Just(json!("class_type")),
        Just(json!("1")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_0-9]{0,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-5i64..20_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z0-9 ._+-]{0,8}".prop_map(Value::String),
        prop::sample::select(vec![
            json!("up.png"),
            json!("nope.png"),
            json!("up.png [output]"),
            json!("area"),
            json!("nearest-exact"),
            json!("euler"),
            json!(" 12 "),
            json!("1_000"),
            json!("1e400"),
            json!("nan"),
            json!("-inf"),
            json!("99999999999999999999999999999999999999999999"),
            json!(1e300),
            json!({}),
            json!([]),
            Value::Null,
            json!(true),
        ]),
    ]
}

#[derive(Debug, Clone)]
enum Input {
    Omit,
    Link(u8, i8),
    Garbage(Value),
    Scalar(Value),
    Wrapped(Value),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        2 => Just(Input::Omit),
        5 => (0u8..10, -2i8..5).prop_map(|(t, s)| Input::Link(t, s)),
        1 => arb_json().prop_map(Input::Garbage),
        5 => scalar().prop_map(Input::Scalar),
        1 => scalar().prop_map(Input::Wrapped),
    ]
}

#[derive(Debug, Clone)]
struct NodeGen {
    class: usize,
    inputs: Vec<Input>,
    extra_key: Option<(String, Value)>,
    corrupt: u8,
    garbage: Value,
}

/// Classes the random graphs draw from: every class, with common ones weighted up.
fn class_pool() -> &'static [String] {
    static POOL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    POOL.get_or_init(build_class_pool)
}

fn build_class_pool() -> Vec<String> {
    let mut pool: Vec<String> = object_info().classes().map(str::to_owned).collect();
    for c in [
        "EmptyImage",
        "ImageInvert",
        "SaveImage",
        "PreviewImage",
        "ImageScale",
        "ImageScaleBy",
        "LoadImage",
        "LoadVideo",
        "LoadAudio",
        "BatchImagesNode",
        "ResizeImageMaskNode",
        "PreviewAny",
        "EmptyLatentImage",
        "MaskToImage",
        "ImageBlur",
    ] {
        for _ in 0..20 {
            pool.push(c.to_owned());
        }
    }
    pool
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        any::<usize>(),
        prop::collection::vec(input(), 12),
        prop::option::weighted(0.2, ("[a-z._0-9]{1,12}", scalar())),
        0u8..120,
        arb_json(),
    )
        .prop_map(|(class, inputs, extra_key, corrupt, garbage)| NodeGen {
            class,
            inputs,
            extra_key,
            corrupt,
            garbage,
        })
}

fn input_names(class: &str) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(node) = object_info().get(class) {
        for cat in ["required", "optional"] {
            if let Some(section) = node["input"].get(cat).and_then(Value::as_object) {
                for (name, spec) in section {
                    // Dynamic inputs are sent as "<name>.<slot>" by the frontend.
                    match spec[0].as_str() {
                        Some("COMFY_AUTOGROW_V3") => {
                            names.push(format!("{name}.image0"));
                            names.push(format!("{name}.image1"));
                        }
                        Some("COMFY_DYNAMICCOMBO_V3") => {
                            names.push(name.clone());
                            names.push(format!("{name}.width"));
                        }
                        _ => names.push(name.clone()),
                    }
                }
            }
        }
    }
    names
}

fn build_graph(nodes: &[NodeGen], pool: &[String]) -> Value {
    let n = nodes.len();
    let mut prompt = Map::new();
    for (i, g) in nodes.iter().enumerate() {
        let class = &pool[g.class % pool.len()];
        let mut inputs = Map::new();
        for (name, inp) in input_names(class).into_iter().zip(&g.inputs) {
            let v = match inp {
                Input::Omit => continue,
                Input::Link(t, s) => json!([(*t as usize % (n + 2)).to_string(), s]),
                Input::Garbage(v) => v.clone(),
                Input::Scalar(v) => v.clone(),
                Input::Wrapped(v) => json!({"__value__": v}),
            };
            inputs.insert(name, v);
        }
        if let Some((k, v)) = &g.extra_key {
            inputs.insert(k.clone(), v.clone());
        }
        let node = match g.corrupt {
            0 => json!({"inputs": inputs}),
            1 => json!({"class_type": "NoSuchNode", "inputs": inputs}),
            2 => json!({"class_type": class, "inputs": g.garbage}),
            3 => g.garbage.clone(),
            4 => json!({"class_type": class}),
            _ => json!({"class_type": class, "inputs": inputs}),
        };
        prompt.insert(i.to_string(), node);
    }
    Value::Object(prompt)
}

fn files() -> UserFiles {
    UserFiles {
        outputs: Vec::new(),
        images: vec!["up.png".into(), "mine.png".into()],
        videos: vec!["v.mp4".into()],
        audio: vec![],
        all: vec!["up.png".into(), "mine.png".into(), "v.mp4".into()],
    }
}

fn check(result: Result<ValidPrompt, comfyume_wire::PromptError>) {
    match result {
        Ok(v) => {
            let prompt = v.prompt.as_object().expect("a valid prompt is an object");
            assert!(!v.outputs_to_execute.is_empty());
            assert!(v.outputs_to_execute.windows(2).all(|w| w[0] < w[1]));
            for o in &v.outputs_to_execute {
                let class = prompt[o]["class_type"].as_str().unwrap();
                assert!(object_info().is_output_node(class), "{o} {class}");
            }
            assert_error_shape(&json!({
                "error": {"type": "", "message": "", "details": "", "extra_info": {}},
                "node_errors": v.node_errors,
            }));
        }
        Err(e) => {
            assert_eq!(e.status(), 400);
            let body = e.body();
            assert_error_shape(&body);
            // The body is valid JSON (no NaN/Infinity sneaking in from Python-style floats).
            let text = serde_json::to_string(&body).unwrap();
            assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bodies_never_panic(body in arb_json()) {
        check(validate_prompt(&body, object_info()));
        check(validate_prompt(&json!({"prompt": body.clone()}), object_info()));
        check(validate_prompt_with_files(&json!({"prompt": body}), object_info(), &files()));
    }

    #[test]
    fn random_graphs_never_panic(
        nodes in prop::collection::vec(node_gen(), 1..9),
        sink in prop::option::weighted(0.7, (0u8..10, -1i8..3, any::<bool>())),
        targets in prop::option::weighted(0.2, arb_json()),
        number in prop::option::weighted(0.2, scalar()),
        extra in prop::option::weighted(0.3, arb_json()),
        client in prop::option::of("[a-z0-9]{0,6}"),
    ) {
        let mut graph = build_graph(&nodes, class_pool());
        if let Some((t, slot, image)) = sink {
            let from = (t as usize % (nodes.len() + 1)).to_string();
            let sink = if image {
                json!({"class_type": "PreviewImage", "inputs": {"images": [from, slot]}})
            } else {
                json!({"class_type": "PreviewAny", "inputs": {"source": [from, slot]}})
            };
            graph.as_object_mut().unwrap().insert("sink".into(), sink);
        }
        let mut body = Map::new();
        body.insert("prompt".into(), graph);
        if let Some(t) = targets { body.insert("partial_execution_targets".into(), t); }
        if let Some(n) = number { body.insert("number".into(), n); }
        if let Some(x) = extra { body.insert("extra_data".into(), x); }
        if let Some(c) = client { body.insert("client_id".into(), Value::String(c)); }
        let body = Value::Object(body);
        let first = validate_prompt(&body, object_info());
        // Deterministic: same body, same answer.
        prop_assert_eq!(
            first.as_ref().map(|v| v.outputs_to_execute.clone()).map_err(|e| e.body()),
            validate_prompt(&body, object_info()).map(|v| v.outputs_to_execute).map_err(|e| e.body())
        );
        check(first);
        check(validate_prompt_with_files(&body, object_info(), &files()));
    }

    #[test]
    fn random_scalars_in_typed_inputs_never_panic(width in scalar(), scale in scalar(), method in scalar()) {
        let body = json!({"prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": method, "scale_by": scale}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "p"}}
        }});
        check(validate_prompt(&body, object_info()));
    }

    #[test]
    fn binary_frames_decode_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(frame) = BinaryFrame::decode(&bytes) {
            // Whatever decodes re-encodes to something that decodes to the same frame.
            let again = BinaryFrame::decode(&frame.encode()).unwrap();
            prop_assert_eq!(again.event_type(), frame.event_type());
            if !matches!(frame, BinaryFrame::PreviewImageWithMetadata { .. }) {
                prop_assert_eq!(frame.encode(), bytes);
            }
        }
    }

    #[test]
    fn jobs_queries_parse_without_panicking(q in "[a-z_=&%,+0-9A-F.-]{0,40}") {
        match JobsQuery::parse(&q) {
            Ok(parsed) => { parsed.apply(vec![json!({"id": "a", "status": "completed"})]); }
            Err(e) => prop_assert_eq!(e.status(), 400),
        }
    }
}

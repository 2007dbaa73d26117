//! Workshop workflow templates shipped inside the binary.
//!
//! Each template is a workflow in ComfyUI's UI format (the LiteGraph JSON the stock frontend saves
//! and loads), stored under `workflows/` and embedded at compile time. The server copies them into
//! every new participant's `workflows/` user data, so `file_name` is the name the participant sees
//! in the Workflows sidebar.
//!
//! `tests/templates.rs` checks every node and widget value against the captured `object_info`.

/// One workshop workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// File name under the user's `workflows/` directory, e.g.
    /// `"Flux.2 Klein 9B - text to image.json"`.
    pub file_name: &'static str,
    /// The workflow, UI format, as the frontend would save it.
    pub json: &'static str,
    /// One sentence for the Templates browser: what it makes and when to pick it.
    pub description: &'static str,
}

impl Template {
    /// The name shown in the Workflows sidebar: the file name without `.json`.
    pub fn name(&self) -> &'static str {
        self.file_name
            .strip_suffix(".json")
            .unwrap_or(self.file_name)
    }
}

macro_rules! template {
    ($name:literal, $description:literal) => {
        Template {
            file_name: concat!($name, ".json"),
            json: include_str!(concat!("../workflows/", $name, ".json")),
            description: $description,
        }
    };
}

static ALL: [Template; 5] = [
    template!(
        "Start here - empty canvas",
        "An empty canvas: add nodes from the library and build your own workflow."
    ),
    template!(
        "Flux.2 Klein 9B - text to image",
        "Text to image with FLUX.2 [klein] 9B: the larger Klein model, for more detail."
    ),
    template!(
        "Flux.2 Klein 4B - text to image",
        "Text to image with FLUX.2 [klein] 4B: the fast one, for quick iterations on a prompt."
    ),
    template!(
        "LTX-2 - text to video",
        "Text to video with LTX-2 19B: a short clip with sound from a prompt."
    ),
    template!(
        "LTX-2 - text to video (distilled)",
        "Text to video with the distilled LTX-2: fewer steps, faster clips."
    ),
];

/// Every workshop template, in the order they are meant to be presented.
pub fn all() -> &'static [Template] {
    &ALL
}

/// The template with this file name, if any.
pub fn find(file_name: &str) -> Option<&'static Template> {
    ALL.iter().find(|t| t.file_name == file_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_unique_json_names_without_path_separators() {
        let mut names: Vec<_> = all().iter().map(|t| t.file_name).collect();
        assert_eq!(names.len(), 5);
        for n in &names {
            assert!(n.ends_with(".json"), "{n}");
            assert!(
                !n.contains('/') && !n.contains('\\') && !n.starts_with('.'),
                "{n}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 5, "duplicate template file names");
    }

    #[test]
    fn find_and_name() {
        let t = find("LTX-2 - text to video.json").expect("template present");
        assert_eq!(t.name(), "LTX-2 - text to video");
        assert!(find("missing.json").is_none());
    }
}

//! Our own frontend extension scripts, embedded in the binary and listed in
//! `/api/extensions` next to the frontend's core ones.

/// (URL path, script body).
pub const SCRIPTS: &[(&str, &str)] = &[(
    "/extensions/comfyume/comfyume.js",
    include_str!("../web/comfyume.js"),
)];

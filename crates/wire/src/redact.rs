//! Job error texts as participants see them: absolute server paths (ComfyUI's
//! tracebacks, file errors) are cut down to their last component, so a
//! participant learns the file, not the server's layout.

use serde_json::Value;

fn is_boundary(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '(' | '[' | '{' | '=' | ',' | '<' | '`')
}

fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ']' | '}' | ',' | ';' | '>' | '`')
}

/// `text` with every absolute path (`/a/b/c.py`, `C:\a\b.py`) replaced by its
/// last component (`c.py`). URLs (`http://host/x`) and one-level paths (`/x`,
/// e.g. an API route) are left alone.
pub fn strip_server_paths(text: &str) -> String {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        let at_boundary = i == 0 || is_boundary(chars[i - 1].1);
        let windows_drive = c.is_ascii_alphabetic()
            && chars.get(i + 1).is_some_and(|x| x.1 == ':')
            && chars.get(i + 2).is_some_and(|x| x.1 == '\\');
        let unix = c == '/' && chars.get(i + 1).is_some_and(|x| x.1 != '/');
        if at_boundary && (unix || windows_drive) {
            let mut j = i;
            while j < chars.len() && !ends_token(chars[j].1) {
                j += 1;
            }
            let end = chars.get(j).map_or(text.len(), |x| x.0);
            let token = &text[pos..end];
            let sep = if windows_drive { '\\' } else { '/' };
            let parts: Vec<&str> = token.split(sep).filter(|p| !p.is_empty()).collect();
            // At least two components: `/x` alone is more often a route than a path.
            if parts.len() >= 2 {
                out.push_str(parts.last().copied().unwrap_or_default());
                i = j;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// [`strip_server_paths`] over every string inside `v`.
pub fn strip_server_paths_in(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('/') || s.contains(":\\") => {
            *s = strip_server_paths(s);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_server_paths_in),
        Value::Object(m) => m.values_mut().for_each(strip_server_paths_in),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_become_names() {
        for (input, want) in [
            (
                "  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n",
                "  File \"execution.py\", line 496, in execute\n",
            ),
            (
                "Invalid image file: /srv/comfyume/data/inputs/user001/nope.png",
                "Invalid image file: nope.png",
            ),
            (
                "[Errno 2] No such file or directory: '/root/models/x.safetensors'",
                "[Errno 2] No such file or directory: 'x.safetensors'",
            ),
            ("C:\\ComfyUI\\nodes.py failed", "nodes.py failed"),
            (
                "see http://host/a/b and /api",
                "see http://host/a/b and /api",
            ),
            ("50/100 steps, a/b relative", "50/100 steps, a/b relative"),
            ("", ""),
            ("é /a/ü/ß.png", "é ß.png"),
        ] {
            assert_eq!(strip_server_paths(input), want, "{input}");
        }
    }

    #[test]
    fn every_string_in_a_value() {
        let mut v = json!({"exception_message": "bad /a/b/c.txt", "traceback": ["File \"/x/y.py\""], "n": 1});
        strip_server_paths_in(&mut v);
        assert_eq!(
            v,
            json!({"exception_message": "bad c.txt", "traceback": ["File \"y.py\""], "n": 1})
        );
    }
}

//! Which participant files a browser may show inline: decided from the file's
//! first bytes, never from its name alone (a `.png` that is really XHTML must
//! not run as a page on this origin). Pure; the caller reads the bytes.

/// How many leading bytes [`media_type`] looks at.
pub const HEAD_LEN: usize = 64;

/// The image, video or audio type `head` (the file's first bytes) starts as,
/// or `None` for anything else, which is then served only as a download. The
/// name only tells apart containers that hold either video or audio (Ogg,
/// Matroska). SVG is not on the list: it is a document that can run script.
pub fn media_type(head: &[u8], name: &str) -> Option<&'static str> {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let at = |i: usize, magic: &[u8]| head.get(i..i + magic.len()) == Some(magic);
    if at(0, b"\x89PNG\r\n\x1a\n") {
        return Some("image/png");
    }
    if at(0, b"\xff\xd8\xff") {
        return Some("image/jpeg");
    }
    if at(0, b"GIF87a") || at(0, b"GIF89a") {
        return Some("image/gif");
    }
    if at(0, b"RIFF") {
        return if at(8, b"WEBP") {
            Some("image/webp")
        } else if at(8, b"WAVE") {
            Some("audio/wav")
        } else if at(8, b"AVI ") {
            Some("video/x-msvideo")
        } else {
            None
        };
    }
    if at(0, b"BM") && head.len() >= 18 {
        // The DIB header sizes of every BMP version: "BM" alone is too common a start.
        let dib = u32::from_le_bytes([head[14], head[15], head[16], head[17]]);
        if matches!(dib, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124) {
            return Some("image/bmp");
        }
        return None;
    }
    if at(0, b"II*\0") || at(0, b"MM\0*") {
        return Some("image/tiff");
    }
    if at(4, b"ftyp") {
        let brand = head.get(8..12).unwrap_or_default();
        return Some(match brand {
            b"avif" | b"avis" => "image/avif",
            b"heic" | b"heix" | b"mif1" | b"msf1" => "image/heic",
            b"M4A " | b"M4B " => "audio/mp4",
            b"qt  " => "video/quicktime",
            _ => "video/mp4",
        });
    }
    if at(0, b"\x1a\x45\xdf\xa3") {
        let webm = head.windows(4).any(|w| w == b"webm");
        return Some(if webm {
            "video/webm"
        } else if matches!(ext.as_str(), "mka") {
            "audio/x-matroska"
        } else {
            "video/x-matroska"
        });
    }
    if at(0, b"OggS") {
        return Some(if ext == "ogv" {
            "video/ogg"
        } else {
            "audio/ogg"
        });
    }
    if at(0, b"fLaC") {
        return Some("audio/flac");
    }
    if at(0, b"ID3") {
        return Some("audio/mpeg");
    }
    if let [0xff, b, ..] = head {
        // MPEG audio frame sync: 11 set bits. Layer bits 00 are AAC (ADTS).
        if b & 0xe0 == 0xe0 {
            return Some(if b & 0x06 == 0 {
                "audio/aac"
            } else {
                "audio/mpeg"
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(prefix: &[u8]) -> Vec<u8> {
        let mut v = prefix.to_vec();
        v.resize(HEAD_LEN, 0);
        v
    }

    #[test]
    fn media_by_content() {
        let cases: &[(&[u8], &str, &str)] = &[
            (b"\x89PNG\r\n\x1a\n", "x.xhtml", "image/png"),
            (b"\xff\xd8\xff\xe0", "x.jpg", "image/jpeg"),
            (b"GIF89a", "x", "image/gif"),
            (b"RIFF\0\0\0\0WEBPVP8 ", "x.webp", "image/webp"),
            (b"RIFF\0\0\0\0WAVEfmt ", "x.wav", "audio/wav"),
            (b"\0\0\0\x20ftypisom", "x.mp4", "video/mp4"),
            (b"\0\0\0\x20ftypavif", "x.avif", "image/avif"),
            (b"\0\0\0\x20ftypM4A ", "x.m4a", "audio/mp4"),
            (
                b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm",
                "x",
                "video/webm",
            ),
            (
                b"\x1a\x45\xdf\xa3\x9f\x42\x82\x88matroska",
                "x.mkv",
                "video/x-matroska",
            ),
            (b"OggS\0\x02", "x.ogg", "audio/ogg"),
            (b"OggS\0\x02", "x.ogv", "video/ogg"),
            (b"fLaC", "x", "audio/flac"),
            (b"ID3\x04", "x.mp3", "audio/mpeg"),
            (b"\xff\xfb\x90", "x.mp3", "audio/mpeg"),
            (b"\xff\xf1\x50", "x.aac", "audio/aac"),
            (b"II*\0", "x.tif", "image/tiff"),
        ];
        for (head, name, want) in cases {
            assert_eq!(media_type(&with(head), name), Some(*want), "{name}");
        }
        let mut bmp = with(b"BM");
        bmp[14] = 40;
        assert_eq!(media_type(&bmp, "x.bmp"), Some("image/bmp"));
    }

    #[test]
    fn documents_and_scripts_are_never_media() {
        for (body, name) in [
            (&b"<?xml version=\"1.0\"?><html xmlns=\"http://www.w3.org/1999/xhtml\"><script>alert(1)</script></html>"[..], "x.png"),
            (b"<html><script>alert(1)</script>", "x.html"),
            (b"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"alert(1)\"/>", "x.svg"),
            (b"<?xml-stylesheet type=\"text/xsl\" href=\"x.xsl\"?>", "x.xml"),
            (b"BMP is not enough: this is text", "x.bmp"),
            (b"RIFF1234ABCD", "x.webp"),
            (b"", "x.png"),
            (b"\xff", "x.mp3"),
            (b"%PDF-1.7", "x.pdf"),
            (b"{\"a\": 1}", "x.json"),
        ] {
            assert_eq!(media_type(body, name), None, "{name}");
        }
    }
}

//! Pixels and files: placeholder rendering, real image operations, PNG (with ComfyUI's text
//! chunks), placeholder video frames, and the preview encodings.

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::imageops::FilterType;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};

use crate::font::{self, GLYPH_H};

/// Largest number of pixels one IMAGE batch may hold (a real server would run out of memory).
pub const MAX_BATCH_PIXELS: u64 = 64 * 1024 * 1024;

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    for (n, slot) in table.iter_mut().enumerate() {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *slot = c;
    }
    table
}

/// CRC-32 as PNG chunks need it.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(crc32_table);
    let mut c = 0xFFFF_FFFFu32;
    for part in parts {
        for &b in *part {
            c = table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    c ^ 0xFFFF_FFFF
}

fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// Split a PNG into (type, data) chunks.
fn chunks(png: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    let mut pos = PNG_SIGNATURE.len();
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes([png[pos], png[pos + 1], png[pos + 2], png[pos + 3]]) as usize;
        let kind = [png[pos + 4], png[pos + 5], png[pos + 6], png[pos + 7]];
        let start = pos + 8;
        let end = start + len;
        if end + 4 > png.len() {
            break;
        }
        out.push((kind, &png[start..end]));
        pos = end + 4;
    }
    out
}

fn plain_png(img: &RgbImage, fast: bool) -> Vec<u8> {
    let mut buf = Vec::new();
    // Fast mode (outputs, video frames): one cheap filter instead of trying all five per row;
    // gradients compress well with Sub anyway.
    let (compression, filter) = if fast {
        (CompressionType::Fast, PngFilter::Sub)
    } else {
        (CompressionType::Default, PngFilter::Adaptive)
    };
    PngEncoder::new_with_quality(&mut buf, compression, filter)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encoding an RGB8 buffer of matching size into memory cannot fail");
    buf
}

/// Latin-1 `tEXt` payload; characters outside Latin-1 become `?` (the JSON we store is ASCII).
fn text_chunk(key: &str, value: &str) -> Vec<u8> {
    let latin1 = |s: &str| -> Vec<u8> {
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect()
    };
    let mut data = latin1(key);
    data.truncate(79);
    data.push(0);
    data.extend(latin1(value));
    data
}

/// PNG with `tEXt` chunks right after IHDR, like PIL's `PngInfo.add_text` (ComfyUI stores
/// `prompt` and `workflow` there).
pub fn png_with_text(img: &RgbImage, texts: &[(String, String)]) -> Vec<u8> {
    let png = plain_png(img, true);
    if texts.is_empty() {
        return png;
    }
    let mut out = Vec::with_capacity(png.len() + 256);
    out.extend_from_slice(PNG_SIGNATURE);
    for (i, (kind, data)) in chunks(&png).into_iter().enumerate() {
        push_chunk(&mut out, &kind, data);
        if i == 0 {
            for (k, v) in texts {
                push_chunk(&mut out, b"tEXt", &text_chunk(k, v));
            }
        }
    }
    out
}

pub fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, quality.clamp(1, 100))
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encoding an RGB8 buffer into memory cannot fail");
    buf
}

/// WebP (the `image` crate writes lossless WebP only).
pub fn webp_rgba(img: &image::RgbaImage) -> Vec<u8> {
    let mut buf = Vec::new();
    WebPEncoder::new_lossless(&mut buf)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgba8,
        )
        .expect("encoding an RGBA8 buffer into memory cannot fail");
    buf
}

pub fn png_rgba(img: &image::RgbaImage) -> Vec<u8> {
    let mut buf = Vec::new();
    PngEncoder::new(&mut buf)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgba8,
        )
        .expect("encoding an RGBA8 buffer into memory cannot fail");
    buf
}

pub fn png_rgb(img: &RgbImage) -> Vec<u8> {
    plain_png(img, false)
}

/// Small deterministic PRNG (xorshift64*), so placeholders and previews repeat exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = (h.rem_euclid(360.0)) / 60.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// Where the stamp goes in a `w` x `h` image with `lines` info lines.
struct StampLayout {
    big: u32,
    small: u32,
    top: i64,
    band: std::ops::Range<u32>,
}

impl StampLayout {
    fn new(title: &str, w: u32, h: u32, lines: usize) -> Self {
        let title_w1 = font::text_width(title, 1).max(1);
        let big = ((w * 8 / 10) / title_w1).min(h / 5 / GLYPH_H).max(1);
        let small = (big / 3).max(1);
        let block_h = GLYPH_H * big + small * 4 + (GLYPH_H + 3) * small * lines as u32;
        let top = i64::from(h.saturating_sub(block_h) / 2);
        let band_top = (top - i64::from(small * 2)).max(0) as u32;
        let band_bottom =
            (top + i64::from(block_h) + i64::from(small * 2)).min(i64::from(h)) as u32;
        Self {
            big,
            small,
            top,
            band: band_top..band_bottom,
        }
    }

    /// Title and lines centred in `img`; lines longer than `max_width` pixels are shortened.
    fn draw_text(&self, img: &mut RgbImage, title: &str, lines: &[String], max_width: u32) {
        let w = img.width();
        let centered = |text: &str, scale: u32| -> i64 {
            (i64::from(w) - i64::from(font::text_width(text, scale))) / 2
        };
        font::draw_text_shadowed(
            img,
            centered(title, self.big),
            self.top,
            title,
            self.big,
            Rgb([255, 255, 255]),
        );
        let max_chars = ((max_width / (font::ADVANCE * self.small)).max(1)) as usize;
        let mut y = self.top + i64::from(GLYPH_H * self.big + self.small * 4);
        for line in lines {
            let text: String = if line.chars().count() > max_chars {
                let mut t: String = line.chars().take(max_chars.saturating_sub(3)).collect();
                t.push_str("...");
                t
            } else {
                line.clone()
            };
            font::draw_text_shadowed(
                img,
                centered(&text, self.small),
                y,
                &text,
                self.small,
                Rgb([255, 230, 120]),
            );
            y += i64::from((GLYPH_H + 3) * self.small);
        }
    }
}

/// A seed-coloured diagonal gradient, `period` pixels per cycle along x, with the stamp band
/// already darkened (the band spans whole rows, so it survives horizontal scrolling).
fn gradient(
    width: u32,
    height: u32,
    seed: u64,
    period: u32,
    band: &std::ops::Range<u32>,
) -> RgbImage {
    let hue1 = (seed % 360) as f32;
    let hue2 = hue1 + 90.0 + ((seed / 360) % 120) as f32;
    let (c1, c2) = (hsv(hue1, 0.55, 0.85), hsv(hue2, 0.65, 0.45));
    let lut: Vec<[u8; 3]> = (0..256)
        .map(|i| {
            let t = i as f32 / 255.0;
            std::array::from_fn(|c| (c1[c] + (c2[c] - c1[c]) * t).clamp(0.0, 255.0) as u8)
        })
        .collect();
    let dark: Vec<[u8; 3]> = lut.iter().map(|p| p.map(|c| c / 3)).collect();
    let ax: Vec<f32> = (0..width)
        .map(|x| x as f32 / period.max(1) as f32)
        .collect();
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    for (y, row) in buf.chunks_exact_mut(width as usize * 3).enumerate() {
        let ay = y as f32 / height.max(1) as f32 * 0.5;
        let colors = if band.contains(&(y as u32)) {
            &dark
        } else {
            &lut
        };
        for (px, a) in row.chunks_exact_mut(3).zip(&ax) {
            let t = (a + ay).fract();
            // Triangle wave, so scrolling by a whole period loops seamlessly.
            let tri = 1.0 - (2.0 * t - 1.0).abs();
            px.copy_from_slice(&colors[(tri * 255.0) as usize]);
        }
    }
    RgbImage::from_raw(width, height, buf).expect("buffer matches size")
}

/// A generated-looking placeholder: a seed-coloured gradient stamped "SIMULATED" plus info lines.
pub fn placeholder(width: u32, height: u32, seed: u64, lines: &[String]) -> RgbImage {
    let (w, h) = (width.max(1), height.max(1));
    let layout = StampLayout::new("SIMULATED", w, h, lines.len());
    let mut img = gradient(w, h, seed, 2 * w, &layout.band);
    layout.draw_text(&mut img, "SIMULATED", lines, w);
    img
}

/// A title card (e.g. a template's thumbnail): the seed-coloured gradient with `title` large
/// and `lines` below it, no SIMULATED stamp (it pictures no generated output). As a PNG.
pub fn title_card_png(
    width: u32,
    height: u32,
    seed: u64,
    title: &str,
    lines: &[String],
) -> Vec<u8> {
    let (w, h) = (width.max(1), height.max(1));
    let layout = StampLayout::new(title, w, h, lines.len());
    let mut img = gradient(w, h, seed, 2 * w, &layout.band);
    layout.draw_text(&mut img, title, lines, w * 9 / 10);
    png_rgb(&img)
}

/// `count` placeholder video frames: the stamped picture sways left and right by whole pixels
/// (two per frame, so an H.264 encoder can copy most of each frame from the one before), with
/// `label(i)` in a fixed box in the bottom-right corner.
pub fn placeholder_frames(
    width: u32,
    height: u32,
    seed: u64,
    lines: &[String],
    count: u32,
    label: impl Fn(u32) -> String,
) -> Vec<RgbImage> {
    let (w, h) = (width.max(1), height.max(1));
    // The sway's amplitude: the title (at most 80% of the width) stays wholly in view.
    let amp = ((w / 10) & !1).clamp(2, 64);
    let layout = StampLayout::new("SIMULATED", w, h, lines.len());
    // Rendered once, 2 * amp wider than a frame; each frame is a window into it.
    let mut wide = gradient(w + 2 * amp, h, seed, 2 * w, &layout.band);
    layout.draw_text(
        &mut wide,
        "SIMULATED",
        lines,
        w.saturating_sub(2 * amp).max(1),
    );
    let small = layout.small;
    (0..count.max(1))
        .map(|i| {
            // A triangle wave over 0..=2*amp, two pixels a frame.
            let pos = (2 * i) % (4 * amp);
            let off = if pos <= 2 * amp { pos } else { 4 * amp - pos };
            let mut img = image::imageops::crop_imm(&wide, off, 0, w, h).to_image();
            let text = label(i);
            let tw = font::text_width(&text, small);
            let th = GLYPH_H * small;
            let (x, y) = (
                i64::from(w) - i64::from(tw) - i64::from(3 * small),
                i64::from(h) - i64::from(th) - i64::from(3 * small),
            );
            for py in (y - i64::from(small)).max(0)..i64::from(h) {
                for px in (x - i64::from(small)).max(0)..i64::from(w) {
                    img.put_pixel(px as u32, py as u32, Rgb([16, 16, 16]));
                }
            }
            font::draw_text(&mut img, x, y, &text, small, Rgb([255, 230, 120]));
            img
        })
        .collect()
}

/// Blend `img` with deterministic noise: `amount` 1.0 is pure noise, 0.0 the image.
pub fn noisy(img: &RgbImage, seed: u64, amount: f32) -> RgbImage {
    let mut rng = Rng::new(seed);
    let a = amount.clamp(0.0, 1.0);
    let mut out = img.clone();
    for px in out.pixels_mut() {
        let r = rng.next_u64();
        for (i, c) in px.0.iter_mut().enumerate() {
            let n = ((r >> (i * 8)) & 0xFF) as f32;
            *c = (f32::from(*c) * (1.0 - a) + n * a) as u8;
        }
    }
    out
}

/// `a` and `b` (same size) mixed: `t` 0.0 is `a`, 1.0 is `b`.
pub fn blend(a: &RgbImage, b: &RgbImage, t: f32) -> RgbImage {
    let t = t.clamp(0.0, 1.0);
    let mut out = b.clone();
    for (o, p) in out.iter_mut().zip(a.as_raw()) {
        *o = (f32::from(*p) * (1.0 - t) + f32::from(*o) * t).round() as u8;
    }
    out
}

pub fn fill(width: u32, height: u32, color: u32) -> RgbImage {
    let rgb = Rgb([
        ((color >> 16) & 0xFF) as u8,
        ((color >> 8) & 0xFF) as u8,
        (color & 0xFF) as u8,
    ]);
    RgbImage::from_pixel(width, height, rgb)
}

pub fn invert(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for px in out.pixels_mut() {
        px.0 = px.0.map(|c| 255 - c);
    }
    out
}

/// Box sizes whose three passes approximate a Gaussian of `sigma`.
fn box_radii(sigma: f32, max_radius: u32) -> [u32; 3] {
    let n = 3.0f32;
    let w_ideal = (12.0 * sigma * sigma / n + 1.0).sqrt();
    let mut wl = w_ideal.floor() as i64;
    if wl % 2 == 0 {
        wl -= 1;
    }
    let wu = wl + 2;
    let m_ideal = (12.0 * sigma * sigma - n * (wl * wl) as f32 - 4.0 * n * wl as f32 - 3.0 * n)
        / (-4.0 * wl as f32 - 4.0);
    let m = m_ideal.round() as i64;
    std::array::from_fn(|i| {
        let size = if (i as i64) < m { wl } else { wu };
        (((size - 1) / 2).max(0) as u32).min(max_radius)
    })
}

fn box_pass(src: &[u8], dst: &mut [u8], w: usize, h: usize, r: usize, horizontal: bool) {
    let (len, lines) = if horizontal { (w, h) } else { (h, w) };
    let idx = |line: usize, i: usize| -> usize {
        if horizontal {
            (line * w + i) * 3
        } else {
            (i * w + line) * 3
        }
    };
    let div = (2 * r + 1) as u32;
    for line in 0..lines {
        for ch in 0..3 {
            let at = |i: isize| -> u32 {
                let i = i.clamp(0, len as isize - 1) as usize;
                u32::from(src[idx(line, i) + ch])
            };
            let mut acc: u32 = (-(r as isize)..=r as isize).map(at).sum();
            for i in 0..len {
                dst[idx(line, i) + ch] = ((acc + div / 2) / div) as u8;
                acc += at(i as isize + r as isize + 1);
                acc -= at(i as isize - r as isize);
            }
        }
    }
}

/// ComfyUI's ImageBlur (Gaussian, kernel `2*radius+1`), approximated by three box blurs.
pub fn blur(img: &RgbImage, radius: u32, sigma: f32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if radius == 0 || w == 0 || h == 0 {
        return img.clone();
    }
    let mut a = img.as_raw().clone();
    let mut b = vec![0u8; a.len()];
    for r in box_radii(sigma, radius) {
        if r == 0 {
            continue;
        }
        box_pass(&a, &mut b, w, h, r as usize, true);
        box_pass(&b, &mut a, w, h, r as usize, false);
    }
    RgbImage::from_raw(img.width(), img.height(), a).expect("same size buffer")
}

fn filter_for(method: &str) -> FilterType {
    match method {
        "nearest-exact" => FilterType::Nearest,
        "bicubic" => FilterType::CatmullRom,
        "lanczos" => FilterType::Lanczos3,
        _ => FilterType::Triangle,
    }
}

/// Python's `round()` (half to even).
pub fn py_round(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// `comfy.utils.common_upscale`: optional centre crop to the new aspect ratio, then resize.
pub fn upscale(
    img: &RgbImage,
    width: u32,
    height: u32,
    method: &str,
    center_crop: bool,
) -> RgbImage {
    let (ow, oh) = img.dimensions();
    let mut view = image::imageops::crop_imm(img, 0, 0, ow, oh).to_image();
    if center_crop && ow > 0 && oh > 0 && height > 0 {
        let old_aspect = f64::from(ow) / f64::from(oh);
        let new_aspect = f64::from(width) / f64::from(height);
        let (mut x, mut y) = (0i64, 0i64);
        if old_aspect > new_aspect {
            x = py_round((f64::from(ow) - f64::from(ow) * (new_aspect / old_aspect)) / 2.0);
        } else if old_aspect < new_aspect {
            y = py_round((f64::from(oh) - f64::from(oh) * (old_aspect / new_aspect)) / 2.0);
        }
        let cw = (i64::from(ow) - 2 * x).max(1) as u32;
        let ch = (i64::from(oh) - 2 * y).max(1) as u32;
        view = image::imageops::crop_imm(img, x as u32, y as u32, cw, ch).to_image();
    }
    image::imageops::resize(&view, width, height, filter_for(method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_known_value() {
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082);
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
    }

    #[test]
    fn png_text_chunks_survive_decoding() {
        let img = fill(4, 3, 0x102030);
        let png = png_with_text(&img, &[("prompt".into(), "{\"a\": 1}".into())]);
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded, img);
        let text_at = png.windows(4).position(|w| w == b"tEXt").unwrap();
        assert!(text_at < png.windows(4).position(|w| w == b"IDAT").unwrap());
    }

    #[test]
    fn ops_are_real() {
        let img = fill(2, 2, 0xFF0000);
        assert_eq!(invert(&img).get_pixel(0, 0), &Rgb([0, 255, 255]));
        let blurred = blur(&fill(5, 5, 0x808080), 3, 1.0);
        assert_eq!(blurred.get_pixel(2, 2), &Rgb([128, 128, 128]));
        assert_eq!(
            upscale(&fill(4, 2, 0), 2, 2, "bilinear", true).dimensions(),
            (2, 2)
        );
        assert_eq!(py_round(0.5), 0);
        assert_eq!(py_round(1.5), 2);
        assert_eq!(py_round(0.01), 0);
        let p = placeholder(64, 32, 7, &["SEED 7".into()]);
        assert_eq!(p, placeholder(64, 32, 7, &["SEED 7".into()]));
        assert_ne!(p, placeholder(64, 32, 8, &["SEED 7".into()]));
        let frames = placeholder_frames(40, 30, 7, &[], 4, |i| format!("FRAME {i}"));
        assert_eq!(frames.len(), 4);
        assert!(frames.iter().all(|f| f.dimensions() == (40, 30)));
        assert_ne!(frames[0], frames[1]);
    }
}

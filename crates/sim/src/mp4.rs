//! An MP4 (ISO BMFF) writer for one H.264 video track, `moov` before `mdat` so a browser can
//! start playing before the whole file has arrived.

use crate::h264::Stream;

fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32 + 8).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

/// A "full box": version and flags before the body.
fn full(kind: &[u8; 4], version: u8, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 4);
    b.push(version);
    b.extend_from_slice(&flags.to_be_bytes()[1..]);
    b.extend_from_slice(body);
    boxed(kind, &b)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    fn matrix(self) -> Self {
        [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000]
            .into_iter()
            .fold(self, Body::u32)
    }
}

/// What the file's handler box calls the track, so any inspector shows it is simulated.
const HANDLER_NAME: &str = "comfyume-sim SIMULATED video (no GPU)";

/// The MP4 file of `stream` at `fps` frames per second.
pub fn mux(stream: &Stream, fps: f64) -> Vec<u8> {
    let fps = if fps.is_finite() {
        fps.clamp(1.0, 240.0)
    } else {
        25.0
    };
    // Thousandths of a second per tick: 25 fps is 25000 ticks a second, 1000 per frame.
    let timescale = (fps * 1000.0).round() as u32;
    let delta = 1000u32;
    let samples: Vec<Vec<u8>> = stream
        .frames
        .iter()
        .map(|au| {
            let mut s = Vec::new();
            for nal in &au.nals {
                s.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                s.extend_from_slice(nal);
            }
            s
        })
        .collect();
    let count = samples.len() as u32;
    let media_duration = count * delta;
    let movie_duration = (u64::from(media_duration) * 1000 / u64::from(timescale)) as u32;

    let ftyp = boxed(
        b"ftyp",
        &Body::default()
            .bytes(b"isom")
            .u32(0x200)
            .bytes(b"isomiso2avc1mp41")
            .0,
    );
    let moov = |chunk_offset: u32| -> Vec<u8> {
        let mvhd = full(
            b"mvhd",
            0,
            0,
            &Body::default()
                .u32(0)
                .u32(0)
                .u32(1000)
                .u32(movie_duration)
                .u32(0x0001_0000)
                .u16(0x0100)
                .u16(0)
                .u32(0)
                .u32(0)
                .matrix()
                .bytes(&[0; 24])
                .u32(2)
                .0,
        );
        let tkhd = full(
            b"tkhd",
            0,
            0x3, // enabled, in movie
            &Body::default()
                .u32(0)
                .u32(0)
                .u32(1)
                .u32(0)
                .u32(movie_duration)
                .u32(0)
                .u32(0)
                .u16(0)
                .u16(0)
                .u16(0)
                .u16(0)
                .matrix()
                .u32(stream.width << 16)
                .u32(stream.height << 16)
                .0,
        );
        let mdhd = full(
            b"mdhd",
            0,
            0,
            &Body::default()
                .u32(0)
                .u32(0)
                .u32(timescale)
                .u32(media_duration)
                .u16(0x55C4) // "und"
                .u16(0)
                .0,
        );
        let mut name = HANDLER_NAME.as_bytes().to_vec();
        name.push(0);
        let hdlr = full(
            b"hdlr",
            0,
            0,
            &Body::default()
                .u32(0)
                .bytes(b"vide")
                .bytes(&[0; 12])
                .bytes(&name)
                .0,
        );
        let vmhd = full(b"vmhd", 0, 1, &[0; 8]);
        let dinf = boxed(
            b"dinf",
            &full(
                b"dref",
                0,
                0,
                &cat(&[&1u32.to_be_bytes(), &full(b"url ", 0, 1, &[])]),
            ),
        );
        let avcc = boxed(
            b"avcC",
            &Body::default()
                .u8(1)
                .u8(stream.sps[1])
                .u8(stream.sps[2])
                .u8(stream.sps[3])
                .u8(0xFF) // 4-byte NAL lengths
                .u8(0xE1) // one SPS
                .u16(stream.sps.len() as u16)
                .bytes(&stream.sps)
                .u8(1) // one PPS
                .u16(stream.pps.len() as u16)
                .bytes(&stream.pps)
                .0,
        );
        let mut compressor = [0u8; 32];
        let label = b"comfyume-sim H.264";
        compressor[0] = label.len() as u8;
        compressor[1..=label.len()].copy_from_slice(label);
        let avc1 = boxed(
            b"avc1",
            &Body::default()
                .bytes(&[0; 6])
                .u16(1) // data_reference_index
                .bytes(&[0; 16])
                .u16(stream.width as u16)
                .u16(stream.height as u16)
                .u32(0x0048_0000)
                .u32(0x0048_0000)
                .u32(0)
                .u16(1) // frame_count
                .bytes(&compressor)
                .u16(0x18)
                .u16(0xFFFF)
                .bytes(&avcc)
                .0,
        );
        let stsd = full(b"stsd", 0, 0, &cat(&[&1u32.to_be_bytes(), &avc1]));
        let stts = full(
            b"stts",
            0,
            0,
            &Body::default().u32(1).u32(count).u32(delta).0,
        );
        let keys: Vec<u32> = (1..=count)
            .filter(|i| stream.frames[*i as usize - 1].key)
            .collect();
        let stss = full(
            b"stss",
            0,
            0,
            &keys
                .iter()
                .fold(Body::default().u32(keys.len() as u32), |b, k| b.u32(*k))
                .0,
        );
        let stsc = full(
            b"stsc",
            0,
            0,
            &Body::default().u32(1).u32(1).u32(count).u32(1).0,
        );
        let stsz = full(
            b"stsz",
            0,
            0,
            &samples
                .iter()
                .fold(Body::default().u32(0).u32(count), |b, s| {
                    b.u32(s.len() as u32)
                })
                .0,
        );
        let stco = full(b"stco", 0, 0, &Body::default().u32(1).u32(chunk_offset).0);
        let stbl = boxed(b"stbl", &cat(&[&stsd, &stts, &stss, &stsc, &stsz, &stco]));
        let minf = boxed(b"minf", &cat(&[&vmhd, &dinf, &stbl]));
        let mdia = boxed(b"mdia", &cat(&[&mdhd, &hdlr, &minf]));
        let trak = boxed(b"trak", &cat(&[&tkhd, &mdia]));
        boxed(b"moov", &cat(&[&mvhd, &trak]))
    };
    // The offset field has a fixed size: measure once, then write the real offset.
    let moov_len = moov(0).len();
    let data_start = (ftyp.len() + moov_len + 8) as u32;
    let payload: usize = samples.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(data_start as usize + payload);
    out.extend_from_slice(&ftyp);
    out.extend_from_slice(&moov(data_start));
    out.extend_from_slice(&(payload as u32 + 8).to_be_bytes());
    out.extend_from_slice(b"mdat");
    for s in &samples {
        out.extend_from_slice(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-level and nested boxes as (path, body) pairs.
    fn walk(data: &[u8], prefix: &str, out: &mut Vec<(String, Vec<u8>)>) {
        let mut pos = 0;
        while pos + 8 <= data.len() {
            let size = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = String::from_utf8_lossy(&data[pos + 4..pos + 8]).to_string();
            assert!(size >= 8 && pos + size <= data.len(), "box {kind} overruns");
            let body = &data[pos + 8..pos + size];
            let path = format!("{prefix}/{kind}");
            out.push((path.clone(), body.to_vec()));
            if matches!(
                kind.as_str(),
                "moov" | "trak" | "mdia" | "minf" | "stbl" | "dinf"
            ) {
                walk(body, &path, out);
            }
            pos += size;
        }
        assert_eq!(pos, data.len(), "trailing bytes under {prefix}");
    }

    #[test]
    fn boxes_nest_and_offsets_point_at_the_samples() {
        let frames: Vec<image::RgbImage> = (0..3)
            .map(|i| image::RgbImage::from_pixel(32, 16, image::Rgb([i * 80, 10, 200])))
            .collect();
        let (stream, _) = crate::h264::encode(&frames, 25.0);
        let file = mux(&stream, 25.0);
        let mut boxes = Vec::new();
        walk(&file, "", &mut boxes);
        let names: Vec<&str> = boxes.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "/ftyp",
            "/moov/mvhd",
            "/moov/trak/tkhd",
            "/moov/trak/mdia/hdlr",
            "/moov/trak/mdia/minf/stbl/stsd",
            "/moov/trak/mdia/minf/stbl/stss",
            "/moov/trak/mdia/minf/stbl/stco",
            "/mdat",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            names.iter().position(|n| *n == "/moov") < names.iter().position(|n| *n == "/mdat")
        );
        let body = |p: &str| boxes.iter().find(|(n, _)| n == p).unwrap().1.clone();
        // stco points at the first sample: its 4-byte length, then the IDR NAL (type 5).
        let stco = body("/moov/trak/mdia/minf/stbl/stco");
        let offset = u32::from_be_bytes(stco[8..12].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(file[offset..offset + 4].try_into().unwrap()) as usize;
        assert_eq!(len, stream.frames[0].nals[0].len());
        assert_eq!(file[offset + 4] & 0x1F, 5);
        // Only the first frame is a sync sample; durations: 3 frames of 1/25 s.
        assert_eq!(
            body("/moov/trak/mdia/minf/stbl/stss")[4..],
            [0, 0, 0, 1, 0, 0, 0, 1]
        );
        let mvhd = body("/moov/mvhd");
        assert_eq!(u32::from_be_bytes(mvhd[16..20].try_into().unwrap()), 120);
        assert!(String::from_utf8_lossy(&body("/moov/trak/mdia/hdlr")).contains("SIMULATED"));
        let mdat = body("/mdat");
        assert_eq!(
            mdat.len(),
            stream
                .frames
                .iter()
                .map(|f| f.nals[0].len() + 4)
                .sum::<usize>()
        );
    }
}

//! A streaming zip writer: files on disk become one zip, written as it is read.
//!
//! Nothing is staged: each file is read in [`CHUNK`]-sized pieces and sent on at once, so
//! memory stays at a few chunks whatever the size of the archive. Sizes and CRCs follow each
//! entry in a data descriptor (bit 3), and entries, offsets or archives past 4 GiB get zip64
//! records. Names are made safe for every OS ([`safe_name`]) and unique without regard to case.
//!
//! ```ignore
//! let entries = vec![export::Entry::new("outputs/a.png", dir.join("a.png"))];
//! return export::response(entries, "my-work.zip");
//! ```

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flate2::Crc;
use futures_util::Stream;
use tokio::sync::mpsc;

/// Bytes read (and sent) at a time; an export holds at most a few of these (1 MiB chunks
/// were no faster in `comfyume-bench export`, and held 4x the memory per download).
pub const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the reading thread and the connection.
const IN_FLIGHT: usize = 4;

/// How an entry's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// As they are: for media that is compressed already (PNG, MP4, WebP ...).
    Stored,
    /// Deflated: for text (workflows, JSON).
    Deflated,
}

impl Method {
    /// Deflate for text-like names, store everything else (images and video would only
    /// cost CPU to deflate).
    pub fn for_name(name: &str) -> Method {
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("json" | "txt" | "csv" | "svg" | "html" | "md" | "yaml" | "yml" | "toml") => {
                Method::Deflated
            }
            _ => Method::Stored,
        }
    }
    fn code(self) -> u16 {
        match self {
            Method::Stored => 0,
            Method::Deflated => 8,
        }
    }
}

/// One file to put in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name inside the zip, `/`-separated (made safe and unique when written).
    pub name: String,
    /// The file on disk. A file that is gone when its turn comes is left out; anything but
    /// a regular file (a folder, a device) too.
    pub path: PathBuf,
    pub method: Method,
}

impl Entry {
    /// An entry whose method is chosen from its name ([`Method::for_name`]).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Entry {
        let name = name.into();
        Entry {
            method: Method::for_name(&name),
            name,
            path: path.into(),
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The names in the archive, in order (after [`safe_name`] and de-duplication).
    pub names: Vec<String>,
    /// Entries left out because their file was gone or not a regular file.
    pub skipped: usize,
    /// Bytes of the whole archive.
    pub bytes: u64,
}

/// The archive as a stream of chunks, produced on tokio's blocking pool as the consumer
/// reads (at most [`IN_FLIGHT`] chunks ahead). A read error ends the stream with that error
/// (so an HTTP body is cut off, never ended as if complete); dropping the stream stops the
/// writer at its next chunk.
pub fn stream(entries: Vec<Entry>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(IN_FLIGHT);
    let failed = tx.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let out = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let r = write_zip_with(&entries, out, ZIP64_AT);
        if let Err(e) = &r
            && !tx.is_closed()
        {
            let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
        }
        r
    });
    // Supervises the writer: logs how it ended and turns a panic into a stream error (the
    // writer's own sender is gone by then; this one keeps the stream open until it is sent).
    tokio::spawn(async move {
        match writer.await {
            Ok(Ok(s)) => tracing::info!(
                entries = s.names.len(),
                skipped = s.skipped,
                bytes = s.bytes,
                "zip export sent"
            ),
            Ok(Err(e)) if failed.is_closed() => {
                tracing::info!(error = %e, "zip export stopped: the client went away")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "zip export failed part-way"),
            Err(e) => {
                tracing::error!(error = %e, "zip export panicked");
                let _ = failed
                    .send(Err(io::Error::other("the zip writer failed")))
                    .await;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

/// A `200` download of the archive: `application/zip`, attachment named `download_name`
/// (reduced to a safe name), never cached.
pub fn response(entries: Vec<Entry>, download_name: &str) -> Response {
    let name = safe_component(download_name);
    // RFC 6266: a plain ASCII fallback, and the exact name in UTF-8.
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '%' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC);
    let disposition = format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}");
    let mut resp = Body::from_stream(stream(entries)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// A participant's work as zip entries: their outputs under `outputs/` (in the subfolders
/// the workflows asked for) and their saved workflows under `workflows/`. Hidden files
/// (in-progress writes, the bookmarks index) and links are left out.
pub async fn participant_work(state: &crate::AppState, user: &str) -> Vec<Entry> {
    let dirs = state.user_dirs(user);
    let workflows = dirs.user_data.join("workflows");
    let mut out = Vec::new();
    for (prefix, dir) in [("outputs", &dirs.outputs), ("workflows", &workflows)] {
        for e in crate::fsx::walk(dir, dir, true).await {
            if !e.is_dir {
                out.push(Entry::new(format!("{prefix}/{}", e.rel), dir.join(&e.rel)));
            }
        }
    }
    out
}

/// `GET /api/comfyume/export.zip`: "Download my work", streamed as it is read.
pub async fn download_my_work(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    who: crate::auth::Participant,
) -> Response {
    let entries = participant_work(&state, &who.name).await;
    tracing::info!(user = %who.name, files = entries.len(), "zip export of a participant's work");
    response(entries, &format!("comfyume-{}-work.zip", who.name))
}

/// Writes the archive to `out` (blocking: run it off the async runtime). Answers what was
/// written; an error leaves `out` with a partial archive.
pub fn write_zip<W: Write>(entries: &[Entry], out: W) -> io::Result<Summary> {
    write_zip_with(entries, Plain(out), ZIP64_AT)
}

/// Entries this large or larger, and offsets past it, get zip64 records.
const ZIP64_AT: u64 = 0xFFFF_FFFF;

/// A deflated entry may come out a little larger than its input: past this input size it
/// gets zip64 records before its compressed size could need them.
fn needs_zip64(size: u64, method: Method, zip64_at: u64) -> bool {
    match method {
        Method::Stored => size >= zip64_at,
        Method::Deflated => size >= zip64_at - zip64_at / 16,
    }
}

/// [`write_zip`] with a lower zip64 threshold (tests reach it without 4 GiB files).
fn write_zip_with<W: Out>(entries: &[Entry], out: W, zip64_at: u64) -> io::Result<Summary> {
    let mut out = Counting { inner: out, pos: 0 };
    let mut names = Names::default();
    let mut central = Vec::new();
    let mut skipped = 0;
    // For deflated entries (stored ones are read straight into the chunks they are sent in).
    let mut buf = vec![0u8; 64 * 1024];
    for e in entries {
        let (file, md) = match File::open(&e.path).and_then(|f| Ok((f.metadata()?, f))) {
            Ok((md, f)) if md.is_file() => (f, md),
            Ok(_) => {
                skipped += 1;
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                skipped += 1;
                continue;
            }
            Err(err) => return Err(err),
        };
        let name = names.claim(&safe_name(&e.name));
        let zip64 = needs_zip64(md.len(), e.method, zip64_at);
        let (time, date) = dos_datetime(md.modified().ok());
        let offset = out.pos;
        out.write_all(&local_header(&name, e.method, time, date, zip64))?;
        let start = out.pos;
        let (crc, size) = match e.method {
            Method::Stored => copy_stored(file, &mut out)?,
            Method::Deflated => {
                let mut enc =
                    flate2::write::DeflateEncoder::new(&mut out, flate2::Compression::default());
                let r = copy_crc(file, &mut enc, &mut buf)?;
                enc.finish()?;
                r
            }
        };
        let compressed = out.pos - start;
        if !zip64 && (size >= zip64_at || compressed >= zip64_at) {
            // Its local header promised 32-bit sizes: the file grew while it was read.
            return Err(io::Error::other(format!(
                "{} grew past 4 GiB while it was being zipped",
                e.path.display()
            )));
        }
        out.write_all(&data_descriptor(crc, compressed, size, zip64))?;
        central.push(Central {
            name,
            method: e.method,
            time,
            date,
            crc,
            compressed,
            size,
            offset,
            zip64,
        });
    }
    let cd_start = out.pos;
    for c in &central {
        out.write_all(&c.record(zip64_at))?;
    }
    let cd_size = out.pos - cd_start;
    let zip64_end = central.len() >= 0xFFFF || cd_start >= zip64_at || cd_size >= zip64_at;
    if zip64_end {
        let end64 = out.pos;
        out.write_all(&zip64_end_records(
            central.len() as u64,
            cd_size,
            cd_start,
            end64,
        ))?;
    }
    out.write_all(&end_record(
        central.len() as u64,
        cd_size,
        cd_start,
        zip64_end,
    ))?;
    out.flush()?;
    Ok(Summary {
        names: central.into_iter().map(|c| c.name).collect(),
        skipped,
        bytes: out.pos,
    })
}

/// Copies `from` to `to` in [`CHUNK`]s handed over whole (read straight into the buffer
/// that is sent on: no copy in between), answering (CRC-32, bytes).
fn copy_stored(mut from: File, to: &mut impl Out) -> io::Result<(u32, u64)> {
    let mut crc = Crc::new();
    let mut total = 0u64;
    loop {
        // read_to_end fills the spare capacity as it is (no zeroing pass first).
        let mut chunk = Vec::with_capacity(CHUNK);
        let filled = (&mut from).take(CHUNK as u64).read_to_end(&mut chunk)?;
        if filled == 0 {
            break;
        }
        crc.update(&chunk);
        total += filled as u64;
        to.put(Bytes::from(chunk))?;
        if filled < CHUNK {
            break;
        }
    }
    Ok((crc.sum(), total))
}

/// Copies `from` to `to`, answering (CRC-32, bytes).
fn copy_crc(mut from: File, to: &mut impl Write, buf: &mut [u8]) -> io::Result<(u32, u64)> {
    let mut crc = Crc::new();
    // Crc::amount() is 32-bit: count the bytes here.
    let mut total = 0u64;
    loop {
        let n = match from.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        crc.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((crc.sum(), total))
}

/// Bit 3: sizes and CRC follow the data. Bit 11: names are UTF-8.
const FLAGS: u16 = (1 << 3) | (1 << 11);
/// Version needed to extract: 2.0 (deflate), 4.5 (zip64).
fn version(zip64: bool) -> u16 {
    if zip64 { 45 } else { 20 }
}

fn local_header(name: &str, method: Method, time: u16, date: u16, zip64: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(30 + name.len() + 20);
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&version(zip64).to_le_bytes());
    h.extend_from_slice(&FLAGS.to_le_bytes());
    h.extend_from_slice(&method.code().to_le_bytes());
    h.extend_from_slice(&time.to_le_bytes());
    h.extend_from_slice(&date.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // CRC: in the data descriptor
    // Sizes: in the data descriptor; a zip64 entry says so here (APPNOTE 4.3.9.2, 4.5.3).
    let size = if zip64 { u32::MAX } else { 0 };
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(if zip64 { 20u16 } else { 0 }).to_le_bytes());
    h.extend_from_slice(name.as_bytes());
    if zip64 {
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes());
    }
    h
}

fn data_descriptor(crc: u32, compressed: u64, size: u64, zip64: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(24);
    d.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
    d.extend_from_slice(&crc.to_le_bytes());
    if zip64 {
        d.extend_from_slice(&compressed.to_le_bytes());
        d.extend_from_slice(&size.to_le_bytes());
    } else {
        d.extend_from_slice(&(compressed as u32).to_le_bytes());
        d.extend_from_slice(&(size as u32).to_le_bytes());
    }
    d
}

/// What the central directory says of one entry.
struct Central {
    name: String,
    method: Method,
    time: u16,
    date: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    offset: u64,
    zip64: bool,
}

impl Central {
    fn record(&self, zip64_at: u64) -> Vec<u8> {
        // The zip64 extra holds, in this order, whichever of the three did not fit.
        let mut extra = Vec::new();
        let mut field = |v: u64, big: bool| -> u32 {
            if big {
                extra.extend_from_slice(&v.to_le_bytes());
                u32::MAX
            } else {
                v as u32
            }
        };
        let size = field(self.size, self.zip64);
        let compressed = field(self.compressed, self.zip64);
        let offset = field(self.offset, self.offset >= zip64_at);
        let needs = self.zip64 || !extra.is_empty();
        let mut r = Vec::with_capacity(46 + self.name.len() + 4 + extra.len());
        r.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        // Made by: Unix (3), so the permission bits below are read.
        r.extend_from_slice(&((3u16 << 8) | version(needs)).to_le_bytes());
        r.extend_from_slice(&version(needs).to_le_bytes());
        r.extend_from_slice(&FLAGS.to_le_bytes());
        r.extend_from_slice(&self.method.code().to_le_bytes());
        r.extend_from_slice(&self.time.to_le_bytes());
        r.extend_from_slice(&self.date.to_le_bytes());
        r.extend_from_slice(&self.crc.to_le_bytes());
        r.extend_from_slice(&compressed.to_le_bytes());
        r.extend_from_slice(&size.to_le_bytes());
        r.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        let extra_len = if extra.is_empty() { 0 } else { 4 + extra.len() };
        r.extend_from_slice(&(extra_len as u16).to_le_bytes());
        r.extend_from_slice(&0u16.to_le_bytes()); // comment
        r.extend_from_slice(&0u16.to_le_bytes()); // disk
        r.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        r.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // a regular file, rw-r--r--
        r.extend_from_slice(&offset.to_le_bytes());
        r.extend_from_slice(self.name.as_bytes());
        if !extra.is_empty() {
            r.extend_from_slice(&1u16.to_le_bytes());
            r.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            r.extend_from_slice(&extra);
        }
        r
    }
}

/// The zip64 end of central directory record and its locator.
fn zip64_end_records(entries: u64, cd_size: u64, cd_start: u64, at: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(56 + 20);
    r.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
    r.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
    r.extend_from_slice(&((3u16 << 8) | 45).to_le_bytes());
    r.extend_from_slice(&45u16.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes()); // this disk
    r.extend_from_slice(&0u32.to_le_bytes()); // the central directory's disk
    r.extend_from_slice(&entries.to_le_bytes());
    r.extend_from_slice(&entries.to_le_bytes());
    r.extend_from_slice(&cd_size.to_le_bytes());
    r.extend_from_slice(&cd_start.to_le_bytes());
    r.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&at.to_le_bytes());
    r.extend_from_slice(&1u32.to_le_bytes()); // disks
    r
}

fn end_record(entries: u64, cd_size: u64, cd_start: u64, zip64: bool) -> Vec<u8> {
    let (n, size, start) = if zip64 {
        (u16::MAX, u32::MAX, u32::MAX)
    } else {
        (entries as u16, cd_size as u32, cd_start as u32)
    };
    let mut r = Vec::with_capacity(22);
    r.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    r.extend_from_slice(&0u16.to_le_bytes());
    r.extend_from_slice(&0u16.to_le_bytes());
    r.extend_from_slice(&n.to_le_bytes());
    r.extend_from_slice(&n.to_le_bytes());
    r.extend_from_slice(&size.to_le_bytes());
    r.extend_from_slice(&start.to_le_bytes());
    r.extend_from_slice(&0u16.to_le_bytes()); // comment
    r
}

/// MS-DOS time and date (UTC; the format has no zone), clamped to 1980-2107.
fn dos_datetime(t: Option<SystemTime>) -> (u16, u16) {
    let Some(t) = t else {
        return (0, (1 << 5) | 1); // 1980-01-01
    };
    let t = time::OffsetDateTime::from(t);
    let year = t.year();
    if year < 1980 {
        return (0, (1 << 5) | 1);
    }
    let year = year.min(2107) as u16;
    let time = ((t.hour() as u16) << 11) | ((t.minute() as u16) << 5) | (t.second() as u16 / 2);
    let date = ((year - 1980) << 9) | ((t.month() as u16) << 5) | t.day() as u16;
    (time, date)
}

/// Longest name component, in bytes (most file systems' limit).
const MAX_COMPONENT: usize = 255;

/// `name` as a path every OS can extract: `/`-separated components (a `\` separates too),
/// with no empty, `.` or `..` component, no character Windows refuses (`<>:"|?*`, control
/// characters), no trailing dot or space, no Windows device name (`CON`, `nul.txt`, `COM1`
/// ...), each at most 255 bytes. Never empty.
pub fn safe_name(name: &str) -> String {
    let parts: Vec<String> = name
        .split(['/', '\\'])
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
        .map(safe_component)
        .collect();
    if parts.is_empty() {
        "_".to_string()
    } else {
        parts.join("/")
    }
}

/// One component of [`safe_name`].
fn safe_component(part: &str) -> String {
    let mut s: String = part
        .chars()
        .map(|c| match c {
            '<' | '>' | ':' | '"' | '|' | '?' | '*' | '/' | '\\' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let trimmed = s.trim_end_matches(['.', ' ']).len();
    s.truncate(trimmed);
    if s.is_empty() {
        return "_".to_string();
    }
    let stem = s
        .split('.')
        .next()
        .unwrap_or("")
        .trim_end()
        .to_ascii_uppercase();
    let device = matches!(
        stem.as_str(),
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$"
    ) || (stem.len() == 4
        && (stem.starts_with("COM") || stem.starts_with("LPT"))
        && stem.as_bytes()[3].is_ascii_digit());
    if device {
        s.insert(0, '_');
    }
    fit(&s, MAX_COMPONENT)
}

/// `s` cut to at most `max` bytes, keeping a short extension.
fn fit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let ext = match s.rfind('.') {
        Some(i) if i > 0 && s.len() - i <= 16 => &s[i..],
        _ => "",
    };
    let mut cut = max - ext.len();
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    // The cut may land after a space or a dot, which Windows drops from a name's end.
    let head = s[..cut].trim_end_matches(['.', ' ']);
    if head.is_empty() && ext.is_empty() {
        return "_".to_string();
    }
    format!("{head}{ext}")
}

/// The names given so far, compared without regard to case (Windows and macOS file
/// systems would make two entries that differ only in case one file).
#[derive(Default)]
struct Names {
    files: HashSet<String>,
    dirs: HashSet<String>,
}

impl Names {
    /// `name` (already safe), changed as little as needed to clash with no earlier file or
    /// folder: `a.png`, `a (2).png`, ...; a folder named like an earlier file becomes `a_`.
    fn claim(&mut self, name: &str) -> String {
        let mut parts: Vec<String> = name.split('/').map(str::to_string).collect();
        let last = parts.len() - 1;
        for i in 0..last {
            let base = parts[i].clone();
            let mut k = 1;
            while self.files.contains(&parts[..=i].join("/").to_lowercase()) {
                // `a_`, `a_2`, ...: each try differs, even for a name at the length limit.
                let suffix = if k == 1 {
                    "_".to_string()
                } else {
                    format!("_{k}")
                };
                parts[i] = format!("{}{suffix}", fit(&base, MAX_COMPONENT - suffix.len()));
                k += 1;
            }
        }
        let dir = parts[..last].join("/");
        let leaf = parts[last].clone();
        let (stem, ext) = match leaf.rfind('.') {
            Some(i) if i > 0 => (&leaf[..i], &leaf[i..]),
            _ => (leaf.as_str(), ""),
        };
        let mut n = 1;
        let full = loop {
            let leaf = if n == 1 {
                leaf.clone()
            } else {
                let suffix = format!(" ({n}){ext}");
                format!("{}{suffix}", fit(stem, MAX_COMPONENT - suffix.len()))
            };
            let full = if dir.is_empty() {
                leaf
            } else {
                format!("{dir}/{leaf}")
            };
            let key = full.to_lowercase();
            if !self.files.contains(&key) && !self.dirs.contains(&key) {
                break full;
            }
            n += 1;
        };
        for i in 0..last {
            self.dirs.insert(parts[..=i].join("/").to_lowercase());
        }
        self.files.insert(full.to_lowercase());
        full
    }
}

/// Where the archive goes: bytes to copy, or whole chunks it may keep as they are.
trait Out: Write {
    /// Takes a chunk of the archive (no copy where the sink can keep it).
    fn put(&mut self, chunk: Bytes) -> io::Result<()> {
        self.write_all(&chunk)
    }
}

/// Any writer, as an [`Out`] that copies.
struct Plain<W>(W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Out for Plain<W> {}

impl<W: Out> Out for Counting<W> {
    fn put(&mut self, chunk: Bytes) -> io::Result<()> {
        let n = chunk.len() as u64;
        self.inner.put(chunk)?;
        self.pos += n;
        Ok(())
    }
}

/// `out`, counting the bytes written (the offsets the central directory needs).
struct Counting<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hands the archive to the async side in [`CHUNK`]s; fails with `BrokenPipe` once the
/// receiver is gone (the client went away), which stops the writer.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl Out for ChannelWriter {
    fn put(&mut self, chunk: Bytes) -> io::Result<()> {
        // What was written before goes first, then the chunk as it is.
        self.send()?;
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::process::Command;

    /// A minimal reader of our own archives: (name, method, crc, compressed, size, offset)
    /// from the central directory, found through the end records.
    fn central(zip: &[u8]) -> Vec<(String, u16, u32, u64, u64, u64)> {
        let u16_at = |i: usize| u16::from_le_bytes([zip[i], zip[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(zip[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(zip[i..i + 8].try_into().unwrap());
        let end = zip.len() - 22;
        assert_eq!(u32_at(end), 0x0605_4b50);
        let (mut n, mut start) = (u16_at(end + 10) as u64, u32_at(end + 16) as u64);
        if n == 0xFFFF {
            let loc = end - 20;
            assert_eq!(u32_at(loc), 0x0706_4b50);
            let e64 = u64_at(loc + 8) as usize;
            assert_eq!(u32_at(e64), 0x0606_4b50);
            n = u64_at(e64 + 32);
            start = u64_at(e64 + 48);
        }
        let mut at = start as usize;
        let mut out = Vec::new();
        for _ in 0..n {
            assert_eq!(u32_at(at), 0x0201_4b50);
            let (nl, xl) = (u16_at(at + 28) as usize, u16_at(at + 30) as usize);
            let name = String::from_utf8(zip[at + 46..at + 46 + nl].to_vec()).unwrap();
            let mut c = u32_at(at + 20) as u64;
            let mut s = u32_at(at + 24) as u64;
            let mut o = u32_at(at + 42) as u64;
            let mut x = at + 46 + nl;
            if xl > 0 {
                assert_eq!(u16_at(x), 1);
                x += 4;
                for v in [&mut s, &mut c, &mut o] {
                    if *v == u32::MAX as u64 {
                        *v = u64_at(x);
                        x += 8;
                    }
                }
            }
            out.push((name, u16_at(at + 10), u32_at(at + 16), c, s, o));
            at += 46 + nl + xl;
        }
        out
    }

    fn crc(b: &[u8]) -> u32 {
        let mut c = Crc::new();
        c.update(b);
        c.sum()
    }

    /// Python's zipfile checks every CRC and reads every entry back (skipped where no
    /// python3 exists).
    fn python_reads(zip: &[u8], expect: &[(&str, &[u8])]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.zip");
        std::fs::write(&path, zip).unwrap();
        let script = "import sys, zipfile, json\nz = zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nprint(json.dumps({n: z.read(n).hex() for n in z.namelist()}))";
        let Ok(out) = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .output()
        else {
            eprintln!("no python3: skipping the cross-check");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got.len(), expect.len());
        for (name, bytes) in expect {
            assert_eq!(got[*name].as_str().unwrap(), hex::encode(bytes), "{name}");
        }
    }

    fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let big: Vec<u8> = (0..CHUNK * 2 + 17).map(|i| (i * 7 % 251) as u8).collect();
        let text = br#"{"nodes": [], "links": [], "version": 0.4}"#.repeat(100);
        let all = vec![
            ("outputs/a.png".to_string(), b"\x89PNG fake".to_vec()),
            ("outputs/video/clip.mp4".to_string(), big),
            ("workflows/flow.json".to_string(), text),
            ("outputs/empty.txt".to_string(), Vec::new()),
        ];
        for (i, (_, b)) in all.iter().enumerate() {
            std::fs::write(dir.join(format!("f{i}")), b).unwrap();
        }
        all
    }

    fn entries(dir: &std::path::Path, all: &[(String, Vec<u8>)]) -> Vec<Entry> {
        all.iter()
            .enumerate()
            .map(|(i, (n, _))| Entry::new(n.clone(), dir.join(format!("f{i}"))))
            .collect()
    }

    #[test]
    fn an_archive_has_every_file_with_its_crc_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let all = files(dir.path());
        let mut zip = Vec::new();
        let s = write_zip(&entries(dir.path(), &all), &mut zip).unwrap();
        assert_eq!(s.bytes, zip.len() as u64);
        assert_eq!(s.skipped, 0);
        let cd = central(&zip);
        assert_eq!(cd.len(), 4);
        for ((name, method, c, compressed, size, offset), (want, bytes)) in cd.iter().zip(&all) {
            assert_eq!(name, want);
            assert_eq!(*c, crc(bytes));
            assert_eq!(*size, bytes.len() as u64);
            assert_eq!(
                u32::from_le_bytes(zip[*offset as usize..][..4].try_into().unwrap()),
                0x0403_4b50
            );
            if name.ends_with(".json") {
                assert_eq!(*method, 8);
                assert!(*compressed < *size / 10, "text is deflated");
            } else if name.ends_with(".txt") {
                assert_eq!(*method, 8);
            } else {
                assert_eq!(*method, 0);
                assert_eq!(compressed, size);
            }
        }
        let expect: Vec<(&str, &[u8])> = all.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
        python_reads(&zip, &expect);
    }

    #[test]
    fn past_the_zip64_threshold_entries_offsets_and_the_end_are_zip64() {
        let dir = tempfile::tempdir().unwrap();
        let all = files(dir.path());
        let mut zip = Vec::new();
        // Threshold 1000 bytes: the big file, the later offsets and the directory's start
        // all take their zip64 forms, as they would past 4 GiB.
        write_zip_with(&entries(dir.path(), &all), Plain(&mut zip), 1000).unwrap();
        let cd = central(&zip);
        assert_eq!(cd[1].4, (CHUNK * 2 + 17) as u64);
        assert!(cd[3].5 > 1000, "a zip64 offset");
        let loc = zip.len() - 22 - 20;
        assert_eq!(&zip[loc..loc + 4], &0x0706_4b50u32.to_le_bytes());
        let expect: Vec<(&str, &[u8])> = all.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
        python_reads(&zip, &expect);
    }

    #[test]
    fn a_file_past_4_gib_gets_64_bit_sizes() {
        // Sparse: 4 GiB + 5 bytes of zeros cost no disk. The archive itself is counted, not
        // kept: only its central directory and end records are looked at.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.bin");
        let f = File::create(&path).unwrap();
        let size = (1u64 << 32) + 5;
        f.set_len(size).unwrap();
        drop(f);
        struct Tail(Vec<u8>, u64);
        impl Write for Tail {
            fn write(&mut self, d: &[u8]) -> io::Result<usize> {
                self.1 += d.len() as u64;
                self.0.extend_from_slice(d);
                if self.0.len() > 4 * CHUNK {
                    self.0.drain(..self.0.len() - CHUNK);
                }
                Ok(d.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut tail = Tail(Vec::new(), 0);
        // The second entry, small, must record an offset past 4 GiB.
        let small = dir.path().join("small.bin");
        std::fs::write(&small, b"tail").unwrap();
        let entries = vec![
            Entry::new("huge.bin", &path),
            Entry::new("after.bin", &small),
        ];
        let s = write_zip(&entries, &mut tail).unwrap();
        assert_eq!(s.bytes, tail.1);
        // Rebuild the tail as if it were a whole archive: offsets are absolute, so shift.
        let base = tail.1 - tail.0.len() as u64;
        let end = tail.0.len() - 22;
        let loc = end - 20;
        let e64 = u64::from_le_bytes(tail.0[loc + 8..loc + 16].try_into().unwrap()) - base;
        // Point the locator and the zip64 end at positions inside the kept tail.
        let cd_start = u64::from_le_bytes(
            tail.0[e64 as usize + 48..e64 as usize + 56]
                .try_into()
                .unwrap(),
        ) - base;
        let mut fake = tail.0.clone();
        fake[loc + 8..loc + 16].copy_from_slice(&e64.to_le_bytes());
        fake[e64 as usize + 48..e64 as usize + 56].copy_from_slice(&cd_start.to_le_bytes());
        let cd = central(&fake);
        assert_eq!(cd.len(), 2);
        assert_eq!(cd[0].0, "huge.bin");
        assert_eq!(cd[0].4, size);
        assert_eq!(cd[0].3, size);
        assert_eq!(cd[1].0, "after.bin");
        assert!(
            cd[1].5 > u32::MAX as u64,
            "the second entry's offset is 64-bit"
        );
        assert_eq!(cd[1].4, 4);
    }

    #[test]
    fn gone_files_and_folders_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("here.png"), b"x").unwrap();
        let entries = vec![
            Entry::new("gone.png", dir.path().join("gone.png")),
            Entry::new("dir", dir.path()),
            Entry::new("here.png", dir.path().join("here.png")),
        ];
        let mut zip = Vec::new();
        let s = write_zip(&entries, &mut zip).unwrap();
        assert_eq!(s.skipped, 2);
        assert_eq!(s.names, ["here.png"]);
        python_reads(&zip, &[("here.png", b"x")]);
    }

    #[test]
    fn names_are_safe_for_every_os() {
        assert_eq!(safe_name("../../etc/passwd"), "etc/passwd");
        assert_eq!(safe_name("/abs//x/./y"), "abs/x/y");
        assert_eq!(safe_name("a\\b\\c.png"), "a/b/c.png");
        assert_eq!(safe_name("what?<is>:this|\"*.png"), "what__is__this___.png");
        assert_eq!(safe_name("tab\there\u{7}.png"), "tab_here_.png");
        assert_eq!(safe_name("trailing. . "), "trailing");
        assert_eq!(safe_name("CON"), "_CON");
        assert_eq!(safe_name("out/nul.txt"), "out/_nul.txt");
        assert_eq!(safe_name("com1.png"), "_com1.png");
        assert_eq!(safe_name("console.png"), "console.png");
        assert_eq!(safe_name(""), "_");
        assert_eq!(safe_name(".."), "_");
        assert_eq!(safe_name("..."), "_");
        assert_eq!(safe_name("été/ﬁlm.mp4"), "été/ﬁlm.mp4");
        let long = format!("{}.png", "é".repeat(200));
        let s = safe_name(&long);
        assert!(s.len() <= 255 && s.ends_with(".png"), "{s}");
        // Cut where a space or a dot ends up last (found by the property below).
        let spaced = format!("{} tail", "ab ".repeat(100));
        let s = safe_name(&spaced);
        assert!(
            s.len() <= 255 && !s.ends_with(' ') && s.starts_with("ab ab"),
            "{s:?}"
        );
        let dotted = safe_name(&format!("a{}", ". ".repeat(200)));
        assert_eq!(
            dotted, "a",
            "nothing but dots and spaces after the first letter"
        );
    }

    #[test]
    fn names_differing_only_in_case_are_told_apart() {
        let mut n = Names::default();
        assert_eq!(n.claim("out/A.png"), "out/A.png");
        assert_eq!(n.claim("out/a.png"), "out/a (2).png");
        assert_eq!(n.claim("OUT/a.PNG"), "OUT/a (3).PNG");
        assert_eq!(n.claim("out"), "out (2)");
        assert_eq!(n.claim("x"), "x");
        assert_eq!(n.claim("x/y"), "x_/y");
        assert_eq!(n.claim("noext"), "noext");
        assert_eq!(n.claim("NOEXT"), "NOEXT (2)");
        // A folder named like earlier files, at the length limit: shortened, never stuck.
        let long = "d".repeat(MAX_COMPONENT);
        assert_eq!(n.claim(&long), long);
        let folder = n.claim(&format!("{long}/f.png"));
        assert_eq!(folder, format!("{}_/f.png", &long[..MAX_COMPONENT - 1]));
        assert_eq!(
            n.claim(&format!("{}_", &long[..MAX_COMPONENT - 1])),
            format!("{} (2)", &long[..MAX_COMPONENT - 4])
        );
        let again = n.claim(&format!("{long}/g.png"));
        assert_eq!(again, format!("{}_/g.png", &long[..MAX_COMPONENT - 1]));
    }

    proptest::proptest! {
        #[test]
        fn claimed_names_are_unique_and_stay_within_limits(
            names in proptest::collection::vec("(d{1,3}|[aA.]{1,300})(/[aA. ]{1,300}){0,2}", 1..24)
        ) {
            let mut n = Names::default();
            let mut seen = HashSet::new();
            for name in names {
                let got = n.claim(&safe_name(&name));
                proptest::prop_assert!(seen.insert(got.to_lowercase()), "{got} twice");
                for part in got.split('/') {
                    proptest::prop_assert!(!part.is_empty() && part.len() <= MAX_COMPONENT);
                }
            }
        }

        #[test]
        fn any_name_becomes_a_safe_relative_path(name in "\\PC{0,300}") {
            let s = safe_name(&name);
            proptest::prop_assert!(!s.is_empty());
            for part in s.split('/') {
                proptest::prop_assert!(!part.is_empty() && part != "." && part != "..");
                proptest::prop_assert!(part.len() <= 255);
                proptest::prop_assert!(!part.ends_with('.') && !part.ends_with(' '));
                proptest::prop_assert!(!part.chars().any(|c| "<>:\"|?*\\".contains(c) || c.is_control()));
            }
        }
    }

    #[test]
    fn dos_times_are_clamped_and_encoded() {
        assert_eq!(dos_datetime(None), (0, 33));
        assert_eq!(dos_datetime(Some(SystemTime::UNIX_EPOCH)), (0, 33));
        // 2024-05-06 07:08:10 UTC
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_714_979_290);
        let (time, date) = dos_datetime(Some(t));
        assert_eq!(date, (44 << 9) | (5 << 5) | 6);
        assert_eq!(time, (7 << 11) | (8 << 5) | 5);
    }

    #[tokio::test]
    async fn the_stream_is_the_archive_and_ends_with_an_error_when_a_read_fails() {
        let dir = tempfile::tempdir().unwrap();
        let all = files(dir.path());
        let mut whole = Vec::new();
        write_zip(&entries(dir.path(), &all), &mut whole).unwrap();
        let mut got = Vec::new();
        let mut s = std::pin::pin!(stream(entries(dir.path(), &all)));
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= CHUNK);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, whole);

        // A file that cannot be read (a folder opened as a file reads with EISDIR only on
        // some systems; a FIFO with no writer would block): a file without read permission
        // when not root, else /proc/self/mem, which refuses plain reads.
        let unreadable = PathBuf::from("/proc/self/mem");
        let bad = vec![
            Entry::new("a.png", dir.path().join("f0")),
            Entry::new("mem.bin", unreadable),
        ];
        let mut s = std::pin::pin!(stream(bad));
        let mut saw_error = false;
        while let Some(chunk) = s.next().await {
            if chunk.is_err() {
                saw_error = true;
            }
        }
        assert!(saw_error, "a failed read ends the stream with an error");
    }

    #[tokio::test]
    async fn a_dropped_stream_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        File::create(&path).unwrap().set_len(64 << 20).unwrap();
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(IN_FLIGHT);
        drop(rx);
        let out = ChannelWriter {
            tx,
            buf: Vec::new(),
        };
        let e = tokio::task::spawn_blocking(move || write_zip(&[Entry::new("big", path)], out))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}

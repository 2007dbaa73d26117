//! Compresses the frontend's static files once (`x.js` -> `x.js.br` and `x.js.gz` beside
//! it) so that page loads are answered from disk: no compression work and no encoder memory
//! per participant (twenty page loads compressing 7 MB of JavaScript each on the fly cost
//! seconds of CPU and hundreds of MiB of encoder buffers). Serving falls back to the plain
//! file for anything not (yet) compressed.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Written last: its presence means every file was done with this [`FORMAT`].
pub const MARKER: &str = ".comfyume-precompressed";
/// Bump when the file set or the settings change, so existing installs are redone.
const FORMAT: &str = "1 br q9 w22, gz 9\n";
const LOCK: &str = ".comfyume-precompress.lock";
/// A lock older than this was left by a process that died mid-way.
const STALE_LOCK: Duration = Duration::from_secs(15 * 60);
/// Smaller files gain nothing worth a second request header.
const MIN_SIZE: u64 = 1024;
/// Text formats only: fonts like woff2 and all images/media are compressed already.
const COMPRESSIBLE: &[&str] = &[
    "js", "mjs", "css", "html", "json", "svg", "txt", "ttf", "otf", "xml", "wasm",
];

#[derive(Debug, thiserror::Error)]
pub enum PrecompressError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "another process is compressing {} (lock {}); it finishes on its own",
        dir.display(),
        LOCK
    )]
    Busy { dir: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PrecompressError + '_ {
    move |source| PrecompressError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Files written (each as .br and/or .gz).
    pub compressed: usize,
    /// Files whose compressed copies were already up to date.
    pub up_to_date: usize,
    pub bytes: u64,
    pub br_bytes: u64,
    pub gz_bytes: u64,
}

/// Whether `dir` was fully compressed with the current settings.
pub fn is_done(dir: &Path) -> bool {
    fs::read_to_string(dir.join(MARKER)).is_ok_and(|s| s == FORMAT)
}

/// Removes the lock file when the run ends, however it ends.
struct LockGuard(PathBuf);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn take_lock(dir: &Path) -> Result<LockGuard, PrecompressError> {
    let path = dir.join(LOCK);
    for _ in 0..2 {
        match File::options().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                let _ = writeln!(f, "{}", std::process::id());
                return Ok(LockGuard(path));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let age = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if age.is_some_and(|a| a < STALE_LOCK) {
                    return Err(PrecompressError::Busy {
                        dir: dir.to_path_buf(),
                    });
                }
                let _ = fs::remove_file(&path);
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Err(PrecompressError::Busy {
        dir: dir.to_path_buf(),
    })
}

fn candidates(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PrecompressError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        // Symlinks are left alone: they might point outside the frontend.
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_dir() {
            candidates(&path, out)?;
        } else if kind.is_file()
            && path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| COMPRESSIBLE.contains(&e))
            && entry.metadata().map_err(io_err(&path))?.len() >= MIN_SIZE
        {
            out.push(path);
        }
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether `target` was written after `source` last changed.
fn fresh(source: &Path, target: &Path) -> bool {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(source), modified(target)), (Some(s), Some(t)) if t >= s)
}

type Encoder = fn(&[u8], &mut dyn Write) -> io::Result<()>;

fn brotli(data: &[u8], out: &mut dyn Write) -> io::Result<()> {
    let params = brotli::enc::BrotliEncoderParams {
        quality: 9,
        lgwin: 22,
        size_hint: data.len(),
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &data[..], &mut &mut *out, &params).map(|_| ())
}

fn gzip(data: &[u8], out: &mut dyn Write) -> io::Result<()> {
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::best());
    enc.write_all(data)?;
    enc.finish().map(|_| ())
}

/// Writes `target` through a temporary file and a rename, so a reader never sees half a
/// file; answers the size kept, or `None` when compression did not make it smaller (then
/// no copy is kept and the plain file is served).
fn write_compressed(
    data: &[u8],
    target: &Path,
    encode: Encoder,
) -> Result<Option<u64>, PrecompressError> {
    let tmp = with_suffix(target, &format!(".tmp{}", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        encode(data, &mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        let len = f.metadata()?.len();
        drop(f);
        if len >= data.len() as u64 {
            fs::remove_file(&tmp)?;
            match fs::remove_file(target) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => return Ok(None),
            }
        }
        fs::rename(&tmp, target)?;
        Ok(Some(len))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(target))
}

/// Compresses every text file of `dir` worth compressing (brotli 9 and gzip 9: brotli 11
/// is 6 % smaller and 5x slower), skipping the ones whose copies are newer than the file,
/// then writes the [`MARKER`]. Safe to run while the files are served and from several
/// processes (one works, the others answer [`PrecompressError::Busy`]).
pub fn precompress(dir: &Path) -> Result<Summary, PrecompressError> {
    let _lock = take_lock(dir)?;
    let mut files = Vec::new();
    candidates(dir, &mut files)?;
    files.sort();
    let marker = dir.join(MARKER);
    // A copy is up to date when newer than its file; an absent copy is too when the last
    // complete run came after the file changed (it found compression did not pay).
    let was_done = is_done(dir);
    let done = |path: &Path, copy: &Path| {
        fresh(path, copy) || (was_done && !copy.exists() && fresh(path, &marker))
    };
    let mut sum = Summary::default();
    for path in files {
        let br = with_suffix(&path, ".br");
        let gz = with_suffix(&path, ".gz");
        if done(&path, &br) && done(&path, &gz) {
            sum.up_to_date += 1;
            continue;
        }
        let data = fs::read(&path).map_err(io_err(&path))?;
        sum.compressed += 1;
        sum.bytes += data.len() as u64;
        sum.br_bytes += write_compressed(&data, &br, brotli)?.unwrap_or(data.len() as u64);
        sum.gz_bytes += write_compressed(&data, &gz, gzip)?.unwrap_or(data.len() as u64);
    }
    fs::write(&marker, FORMAT).map_err(io_err(&marker))?;
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| format!("const v{i} = {};\n", i % 7))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn compresses_text_files_once_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("assets/sub")).unwrap();
        let js = text(2000);
        fs::write(root.join("assets/sub/app.js"), &js).unwrap();
        fs::write(root.join("index.html"), text(100)).unwrap();
        fs::write(root.join("small.css"), "a{}").unwrap();
        fs::write(root.join("logo.png"), vec![7u8; 4096]).unwrap();
        // Random bytes do not compress: no copy is kept.
        let noise: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        fs::write(root.join("noise.json"), &noise).unwrap();
        assert!(!is_done(root));

        let sum = precompress(root).unwrap();
        assert!(is_done(root));
        assert_eq!((sum.compressed, sum.up_to_date), (3, 0));
        assert!(
            sum.br_bytes < sum.bytes && sum.gz_bytes < sum.bytes,
            "{sum:?}"
        );

        let mut back = Vec::new();
        brotli::Decompressor::new(
            &fs::read(root.join("assets/sub/app.js.br")).unwrap()[..],
            4096,
        )
        .read_to_end(&mut back)
        .unwrap();
        assert_eq!(back, js);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&fs::read(root.join("assets/sub/app.js.gz")).unwrap()[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, js);
        for absent in [
            "small.css.br",
            "logo.png.br",
            "noise.json.br",
            "noise.json.gz",
        ] {
            assert!(!root.join(absent).exists(), "{absent}");
        }
        assert!(!root.join(LOCK).exists());
        let leftovers: Vec<_> = walk(root)
            .into_iter()
            .filter(|p| p.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // A second run only checks; a changed file is redone.
        assert_eq!(precompress(root).unwrap().up_to_date, 3);
        std::thread::sleep(Duration::from_millis(20));
        fs::write(root.join("index.html"), text(300)).unwrap();
        let sum = precompress(root).unwrap();
        assert_eq!((sum.compressed, sum.up_to_date), (1, 2));
    }

    #[test]
    fn a_live_lock_makes_a_second_run_wait_its_turn_and_a_stale_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.js"), text(500)).unwrap();
        let held = take_lock(dir.path()).unwrap();
        assert!(matches!(
            precompress(dir.path()),
            Err(PrecompressError::Busy { .. })
        ));
        assert!(!is_done(dir.path()));
        drop(held);
        // A lock left by a dead process (old mtime) does not block forever.
        let lock = dir.path().join(LOCK);
        fs::write(&lock, "1").unwrap();
        File::options()
            .write(true)
            .open(&lock)
            .unwrap()
            .set_modified(SystemTime::now() - STALE_LOCK - Duration::from_secs(1))
            .unwrap();
        precompress(dir.path()).unwrap();
        assert!(is_done(dir.path()));
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }
}

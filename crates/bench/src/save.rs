//! `save`: a download client that costs little, for the `export` benchmark. It reads the
//! response in 1 MiB pieces and writes the body's bytes straight from that buffer to the
//! file. curl reads 16 KiB at a time (its fixed buffer) and spent more CPU receiving the zip
//! than the server spent making it, so with both on two cores it measured curl as much as
//! the server. Plain HTTP/1.1 over loopback: one GET, `Connection: close`, the body either
//! chunked or of a stated length.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `http://HOST:PORT/PATH`.
    pub url: String,
    /// A `Cookie` header value to send.
    #[arg(long)]
    pub cookie: Option<String>,
    /// The file the body is written to.
    #[arg(long)]
    pub out: PathBuf,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line.
    Size,
    /// In a chunk's data, with this many bytes left.
    Data(u64),
    /// In the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer, after the last (zero) chunk.
    Trailer,
    Done,
}

/// An incremental decoder of HTTP/1.1's chunked transfer coding (RFC 9112 §7.1).
#[derive(Debug)]
pub struct Dechunk {
    state: State,
    /// The current line (size line, CRLF, trailer line) so far.
    line: Vec<u8>,
}

impl Default for Dechunk {
    fn default() -> Self {
        Self {
            state: State::Size,
            line: Vec::new(),
        }
    }
}

/// A malformed chunked body.
fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl Dechunk {
    /// Feeds the next bytes of the body; `out` gets every run of data bytes, in order.
    /// Returns whether the body ended (bytes after that are ignored).
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        while !input.is_empty() && self.state != State::Done {
            match self.state {
                State::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out(&input[..n])?;
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                _ => {
                    // A line: up to and including its LF.
                    let (taken, complete) = match input.iter().position(|b| *b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (input.len(), false),
                    };
                    if self.line.len() + taken > 4096 {
                        return Err(bad("a chunk line longer than 4 KiB"));
                    }
                    self.line.extend_from_slice(&input[..taken]);
                    input = &input[taken..];
                    if complete {
                        self.end_line()?;
                    }
                }
            }
        }
        Ok(self.state == State::Done)
    }

    fn end_line(&mut self) -> io::Result<()> {
        let line = std::mem::take(&mut self.line);
        let text = line
            .strip_suffix(b"\r\n")
            .ok_or_else(|| bad("a chunk line not ended by CRLF"))?;
        self.state = match self.state {
            State::Size => {
                // Extensions after `;` are allowed and ignored.
                let hex = text.split(|b| *b == b';').next().unwrap_or_default();
                let hex = std::str::from_utf8(hex).map_err(|_| bad("a chunk size"))?;
                let size = u64::from_str_radix(hex.trim(), 16).map_err(|_| bad("a chunk size"))?;
                if size == 0 {
                    State::Trailer
                } else {
                    State::Data(size)
                }
            }
            State::DataEnd if text.is_empty() => State::Size,
            State::DataEnd => return Err(bad("chunk data longer than its size")),
            State::Trailer if text.is_empty() => State::Done,
            State::Trailer => State::Trailer,
            State::Data(_) | State::Done => unreachable!("no line is read in these states"),
        };
        Ok(())
    }
}

/// GETs `url` into `out`; the body's length.
pub fn save(url: &str, cookie: Option<&str>, out: &std::path::Path) -> Result<u64> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs (loopback)")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .with_context(|| format!("{host} names no address"))?;
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {host}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    sock.set_write_timeout(Some(Duration::from_secs(60)))?;
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        sock,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n"
    )?;

    let mut buf = vec![0u8; 1 << 20];
    let mut filled = 0;
    let head_end = loop {
        let n = sock.read(&mut buf[filled..])?;
        if n == 0 {
            bail!("the connection closed before the response's headers ended");
        }
        filled += n;
        if let Some(i) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if filled == buf.len() {
            bail!("response headers longer than 1 MiB");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        bail!("GET {url}: HTTP {status}");
    }
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .map(str::to_string)
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let length = header("content-length").and_then(|v| v.parse::<u64>().ok());
    if !chunked && length.is_none() {
        bail!("a response with neither a length nor chunks");
    }

    let mut file = std::fs::File::create(out)?;
    let mut written = 0u64;
    let mut dechunk = Dechunk::default();
    let mut start = head_end;
    loop {
        let body = &buf[start..filled];
        let done = if chunked {
            dechunk.feed(body, &mut |b: &[u8]| {
                written += b.len() as u64;
                file.write_all(b)
            })?
        } else {
            written += body.len() as u64;
            file.write_all(body)?;
            written >= length.unwrap_or(0)
        };
        if done {
            break;
        }
        let n = sock.read(&mut buf)?;
        if n == 0 {
            bail!("the connection closed after {written} bytes of the body");
        }
        (start, filled) = (0, n);
    }
    if let Some(want) = length.filter(|_| !chunked)
        && written != want
    {
        bail!("{written} bytes of a body of {want}");
    }
    Ok(written)
}

pub fn run(a: Args) -> Result<()> {
    save(&a.url, a.cookie.as_deref(), &a.out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in body.chunks(piece) {
            out.extend_from_slice(format!("{:x};ext=1\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
        out
    }

    fn decode(wire: &[u8], split: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut d = Dechunk::default();
        let mut got = Vec::new();
        let mut done = false;
        for part in wire.chunks(split) {
            done = d.feed(part, &mut |b: &[u8]| {
                got.extend_from_slice(b);
                Ok(())
            })?;
        }
        Ok((got, done))
    }

    #[test]
    fn decodes_a_chunked_body_however_it_is_split() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for piece in [1, 7, 4096, 10_000] {
            let wire = chunked(&body, piece);
            for split in [1, 2, 3, 5, 64, 1000, wire.len()] {
                let (got, done) = decode(&wire, split).unwrap();
                assert!(done, "piece {piece}, split {split}: the end was seen");
                assert!(got == body, "piece {piece}, split {split}: the body");
            }
        }
    }

    /// A one-request server on loopback that answers `response`; its URL.
    fn answering(response: Vec<u8>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://{}/user001/api/comfyume/export.zip",
            listener.local_addr().unwrap()
        );
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                assert!(n > 0, "the request ended early");
                req.extend_from_slice(&b[..n]);
            }
            let req = String::from_utf8(req).unwrap();
            assert!(
                req.starts_with("GET /user001/api/comfyume/export.zip HTTP/1.1\r\n"),
                "{req}"
            );
            assert!(req.contains("\r\nCookie: s=1\r\n"), "{req}");
            s.write_all(&response).unwrap();
        });
        url
    }

    #[test]
    fn saves_a_chunked_or_sized_body_and_refuses_an_error_status() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("work.zip");
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut chunked_resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        chunked_resp.extend(chunked(&body, 65_536));
        let url = answering(chunked_resp);
        assert_eq!(save(&url, Some("s=1"), &out).unwrap(), body.len() as u64);
        assert!(
            std::fs::read(&out).unwrap() == body,
            "the chunked body, byte for byte"
        );

        let mut sized =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        sized.extend_from_slice(&body);
        let url = answering(sized);
        assert_eq!(save(&url, Some("s=1"), &out).unwrap(), body.len() as u64);
        assert!(
            std::fs::read(&out).unwrap() == body,
            "the sized body, byte for byte"
        );

        let url = answering(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec());
        let err = save(&url, Some("s=1"), &out).unwrap_err().to_string();
        assert!(err.contains("HTTP 401"), "{err}");

        // Cut short: the chunked body never ends.
        let mut cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        cut.extend(&chunked(&body, 65_536)[..100_000]);
        let url = answering(cut);
        let err = save(&url, Some("s=1"), &out).unwrap_err().to_string();
        assert!(err.contains("closed after"), "{err}");
    }

    #[test]
    fn an_unfinished_body_is_not_done_and_bad_framing_is_an_error() {
        let wire = chunked(b"hello world", 4);
        let (got, done) = decode(&wire[..wire.len() - 2], 3).unwrap();
        assert_eq!((got.as_slice(), done), (&b"hello world"[..], false));
        assert!(
            decode(b"zz\r\nab\r\n0\r\n\r\n", 4).is_err(),
            "a size that is not hex"
        );
        assert!(
            decode(b"2\r\nabc\r\n0\r\n\r\n", 4).is_err(),
            "more data than the size"
        );
        assert!(decode(b"2\nab\r\n0\r\n\r\n", 4).is_err(), "a bare LF");
    }
}

//! The `comfyume` binary as the instructor runs it: accounts, the workshop
//! credentials sheet, htpasswd import, node definitions, and `serve`.

use crate::helpers;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use comfyume_store::{MetaStore, PasswordScheme, UserStore};

const BIN: &str = env!("CARGO_BIN_EXE_comfyume");

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    Env {
        data: root.join("data"),
        root,
        _tmp: tmp,
    }
}

/// A command with a clean environment (no COMFYUME_* or .env from the host),
/// run from the temp dir so no stray `.env` is picked up.
fn cmd(e: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("RUST_LOG", "warn")
        .current_dir(&e.root)
        .arg("--data-dir")
        .arg(&e.data)
        .args(args);
    c
}

fn run(e: &Env, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = cmd(e, args);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn ok(e: &Env, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(e, args, stdin);
    assert!(
        out.status.success(),
        "comfyume {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns stdout + stderr.
fn fails(e: &Env, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(e, args, stdin);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "comfyume {args:?} should fail: {text}"
    );
    text
}

async fn store(e: &Env) -> comfyume_store::sqlite::SqliteStore {
    comfyume_store::sqlite::SqliteStore::open(&e.data.join("comfyume.db"))
        .await
        .unwrap()
}

async fn verifies(e: &Env, name: &str, password: &str) -> bool {
    store(e)
        .await
        .verify_password(name, password)
        .await
        .unwrap()
        .is_some()
}

fn generated_password(stdout: &str) -> String {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("a generated password line");
    assert_eq!(line.len(), 14, "{line}");
    line.to_string()
}

fn list_line(e: &Env, name: &str) -> Option<String> {
    ok(e, &["users", "list"], None)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(str::to_string)
}

#[tokio::test]
async fn an_instructor_manages_accounts_from_the_command_line() {
    let e = env();
    let out = ok(
        &e,
        &["users", "add", "alice", "--password-stdin"],
        Some("alice-pass-1\n"),
    );
    assert!(out.contains("created alice (participant)"), "{out}");
    assert!(
        !out.contains("password:"),
        "a given password is not echoed: {out}"
    );
    assert!(verifies(&e, "alice", "alice-pass-1").await);

    let out = ok(&e, &["users", "add", "bob"], None);
    let bob_pw = generated_password(&out);
    assert!(verifies(&e, "bob", &bob_pw).await);
    let out = ok(
        &e,
        &["users", "add", "carol", "--admin", "--password-stdin"],
        Some("carol-pass"),
    );
    assert!(out.contains("created carol (admin)"), "{out}");
    assert!(
        fails(
            &e,
            &["users", "add", "alice", "--password-stdin"],
            Some("x")
        )
        .contains("already exists")
    );
    assert!(
        fails(
            &e,
            &["users", "add", "dave", "--password-stdin"],
            Some("\n")
        )
        .contains("empty")
    );

    let list = ok(&e, &["users", "list"], None);
    assert!(list.lines().next().unwrap().starts_with("name"), "{list}");
    let alice = list_line(&e, "alice").unwrap();
    assert!(
        alice.contains("participant") && alice.contains("active"),
        "{alice}"
    );
    let carol = list_line(&e, "carol").unwrap();
    assert!(
        carol.contains("admin") && carol.ends_with("never"),
        "{carol}"
    );
    assert!(list_line(&e, "bob").is_some());

    ok(
        &e,
        &["users", "passwd", "alice", "--password-stdin"],
        Some("alice-pass-2\n"),
    );
    assert!(
        !verifies(&e, "alice", "alice-pass-1").await,
        "the old password stops working"
    );
    assert!(verifies(&e, "alice", "alice-pass-2").await);
    assert!(
        list_line(&e, "alice").unwrap().split_whitespace().last() != Some("never"),
        "last login recorded"
    );
    let out = ok(&e, &["users", "passwd", "bob"], None);
    let bob_new = generated_password(&out);
    assert!(verifies(&e, "bob", &bob_new).await && !verifies(&e, "bob", &bob_pw).await);

    ok(&e, &["users", "disable", "alice"], None);
    assert!(list_line(&e, "alice").unwrap().contains("disabled"));
    assert!(
        !verifies(&e, "alice", "alice-pass-2").await,
        "a disabled account cannot sign in"
    );
    ok(&e, &["users", "enable", "alice"], None);
    assert!(list_line(&e, "alice").unwrap().contains("active"));
    assert!(verifies(&e, "alice", "alice-pass-2").await);

    ok(&e, &["users", "remove", "bob"], None);
    assert!(list_line(&e, "bob").is_none());
    assert!(fails(&e, &["users", "remove", "bob"], None).contains("no account named 'bob'"));
    assert!(
        fails(
            &e,
            &["users", "passwd", "nosuch", "--password-stdin"],
            Some("x")
        )
        .contains("no account named")
    );
    assert!(fails(&e, &["users", "disable", "nosuch"], None).contains("no account named"));
}

#[tokio::test]
async fn names_that_would_shadow_a_route_are_refused() {
    let e = env();
    for name in [
        "api",
        "assets",
        "login",
        "ws",
        "templates",
        "index.html",
        "a.b",
        "has/slash",
        "sp ace",
    ] {
        let text = fails(&e, &["users", "add", name, "--password-stdin"], Some("pw"));
        assert!(
            text.contains("account name") || text.contains("account names"),
            "{name}: {text}"
        );
    }
    assert!(fails(&e, &["users", "add", "api", "--password-stdin"], Some("pw")).contains("route"));
    let list = ok(&e, &["users", "list"], None);
    assert_eq!(list.lines().count(), 1, "only the header: {list}");
}

#[tokio::test]
async fn a_workshop_sheet_is_printed_and_written_privately() {
    use std::os::unix::fs::PermissionsExt;
    let e = env();
    let csv = e.root.join("sheet.csv");
    // A stale, world-readable sheet from an earlier run is narrowed, not reused as is.
    std::fs::write(&csv, "old").unwrap();
    std::fs::set_permissions(&csv, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ok(
        &e,
        &[
            "users",
            "create-workshop",
            "--count",
            "3",
            "--csv",
            csv.to_str().unwrap(),
        ],
        None,
    );
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("username") && header.contains("password") && header.contains("url"),
        "{out}"
    );
    for u in ["user001", "user002", "user003"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(u) && l.ends_with(&format!("/{u}/"))),
            "{u} in the table: {out}"
        );
    }
    assert!(!out.contains("user004"));
    let mode = std::fs::metadata(&csv).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credentials file is private");
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "username,password,url");
    assert_eq!(rows.len(), 4, "{text}");
    for (i, row) in rows[1..].iter().enumerate() {
        let cols: Vec<&str> = row.split(',').collect();
        let name = format!("user{:03}", i + 1);
        assert_eq!(
            (cols[0], cols[2]),
            (name.as_str(), format!("/{name}/").as_str())
        );
        assert!(out.contains(row), "the CSV is printed too");
        assert!(
            verifies(&e, &name, cols[1]).await,
            "{name}'s sheet password works"
        );
    }
    // Running it again keeps existing accounts (and their passwords).
    let again = run(&e, &["users", "create-workshop", "--count", "3"], None);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let first = rows[1].split(',').nth(1).unwrap();
    assert!(verifies(&e, "user001", first).await);
    assert!(fails(&e, &["users", "create-workshop", "--count", "0"], None).contains("--count"));
}

#[tokio::test]
async fn object_info_import_refuses_what_is_not_object_info() {
    let e = env();
    let bad = [
        ("list.json", "[1, 2]", "not a ComfyUI object_info document"),
        (
            "wrong.json",
            r#"{"Foo": {"bar": 1}}"#,
            "lacks 'input'/'output'",
        ),
        ("text.json", "hello", "is not JSON"),
    ];
    for (name, body, msg) in bad {
        let f = e.root.join(name);
        std::fs::write(&f, body).unwrap();
        let text = fails(&e, &["object-info", "import", f.to_str().unwrap()], None);
        assert!(text.contains(msg), "{name}: {text}");
    }
    assert!(fails(&e, &["object-info", "import", "/nonexistent/o.json"], None).contains("reading"));
    assert!(
        store(&e)
            .await
            .get_meta(comfyume_gateway::OBJECT_INFO_KEY)
            .await
            .unwrap()
            .is_none(),
        "nothing stored"
    );

    let real = helpers::shared("api/object_info.json");
    let out = ok(&e, &["object-info", "import", real.to_str().unwrap()], None);
    assert!(out.contains("imported 592 node definitions"), "{out}");
    let meta = store(&e)
        .await
        .get_meta(comfyume_gateway::OBJECT_INFO_KEY)
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta.value).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 592);
}

#[tokio::test]
async fn serve_without_a_frontend_says_how_to_install_it() {
    let e = env();
    let start = Instant::now();
    let out = run(
        &e,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scripts/install-frontend.sh"), "{err}");
    assert!(err.contains("comfyui-frontend-package"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// `serve` on port 0 with a fake frontend; returns the child and its address.
fn start_serve(e: &Env) -> (Child, String) {
    let frontend = e.root.join("frontend");
    helpers::fake_frontend(&frontend);
    let mut c = cmd(
        e,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--frontend-dir",
            frontend.to_str().unwrap(),
        ],
    );
    c.stderr(Stdio::null());
    let (child, url) = helpers::spawn_serve(c);
    let addr = url.trim_start_matches("http://").to_string();
    assert!(addr.parse::<std::net::SocketAddr>().is_ok(), "{addr}");
    (child, addr)
}

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn get(addr: &str, path: &str, cred: Option<(&str, &str)>) -> reqwest::StatusCode {
    let mut rb = helpers::TestApp::client().get(format!("http://{addr}{path}"));
    if let Some((u, p)) = cred {
        rb = rb.basic_auth(u, Some(p));
    }
    rb.send().await.unwrap().status()
}

#[tokio::test]
async fn serve_listens_answers_and_stops_promptly_on_sigterm() {
    let e = env();
    ok(
        &e,
        &["users", "add", "ann", "--password-stdin"],
        Some("ann-pass"),
    );
    let (mut child, addr) = start_serve(&e);
    assert_eq!(
        get(&addr, "/api/system_stats", Some(("ann", "ann-pass"))).await,
        200
    );
    assert_eq!(get(&addr, "/api/system_stats", None).await, 401);
    assert_eq!(get(&addr, "/healthz", None).await, 200);
    // An open participant socket must not hold the shutdown up.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{addr}/ann/ws?clientId=x"),
    )
    .unwrap();
    use base64::Engine;
    let cred = base64::engine::general_purpose::STANDARD.encode("ann:ann-pass");
    req.headers_mut()
        .insert("authorization", format!("Basic {cred}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(helpers::next_json(&mut ws).await["data"]["sid"], "x");

    let start = Instant::now();
    let status = sigterm_and_wait(&mut child);
    assert!(status.success(), "exit status {status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn htpasswd_accounts_sign_in_and_are_rehashed_to_argon2id() {
    let e = env();
    let dana = bcrypt::hash_with_result("dana-pass", 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoY);
    let frank = bcrypt::hash("frank-pass", 4).unwrap();
    assert!(dana.starts_with("$2y$04$") && frank.starts_with("$2b$04$"));
    let file = e.root.join("htpasswd");
    std::fs::write(
        &file,
        format!(
            "# nginx htpasswd\ndana:{dana}\neve:$apr1$abcdefgh$0123456789abcdefghijkl\napi:{frank}\nnot a line\n\nfrank:{frank}\n"
        ),
    )
    .unwrap();
    let out = run(
        &e,
        &["users", "import-htpasswd", file.to_str().unwrap()],
        None,
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("imported 2 account(s), skipped 3"),
        "{stdout}{stderr}"
    );
    assert!(
        stderr.contains("eve") && stderr.contains("not a bcrypt hash"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4") && stderr.contains("line 5"),
        "{stderr}"
    );
    {
        let s = store(&e).await;
        assert_eq!(
            s.password_scheme("dana").await.unwrap(),
            Some(PasswordScheme::Bcrypt)
        );
        assert_eq!(s.password_scheme("eve").await.unwrap(), None);
        assert!(s.get_user("api").await.unwrap().is_none());
    }

    let (mut child, addr) = start_serve(&e);
    assert_eq!(
        get(&addr, "/api/settings", Some(("dana", "wrong"))).await,
        401
    );
    assert_eq!(
        get(&addr, "/api/settings", Some(("dana", "dana-pass"))).await,
        200
    );
    assert!(sigterm_and_wait(&mut child).success());

    let s = store(&e).await;
    assert_eq!(
        s.password_scheme("dana").await.unwrap(),
        Some(PasswordScheme::Argon2id),
        "rehashed at sign-in"
    );
    assert_eq!(
        s.password_scheme("frank").await.unwrap(),
        Some(PasswordScheme::Bcrypt),
        "not signed in yet"
    );
    assert!(
        s.verify_password("dana", "dana-pass")
            .await
            .unwrap()
            .is_some(),
        "same password, new hash"
    );
    assert!(
        s.verify_password("frank", "frank-pass")
            .await
            .unwrap()
            .is_some()
    );
}

/// `serve` compresses a writable frontend once in the background; by hand,
/// `comfyume frontend precompress` does the same (default: under the data directory).
#[tokio::test]
async fn the_frontend_is_compressed_once_by_serve_or_by_hand() {
    let e = env();
    let (mut child, _addr) = start_serve(&e);
    let fe = e.root.join("frontend");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fe.join(".comfyume-precompressed").exists() {
        assert!(
            Instant::now() < deadline,
            "serve did not precompress the frontend"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fe.join("assets/index-abc.js.br").is_file());
    assert!(fe.join("assets/index-abc.js.gz").is_file());
    assert!(sigterm_and_wait(&mut child).success());

    let fe_arg = fe.to_str().unwrap();
    let out = ok(
        &e,
        &["frontend", "precompress", "--frontend-dir", fe_arg],
        None,
    );
    assert!(
        out.contains(": 0 compressed") && out.contains("1 already up to date"),
        "{out}"
    );

    helpers::fake_frontend(&e.data.join("frontend/1.37.11"));
    let out = ok(&e, &["frontend", "precompress"], None);
    assert!(out.contains(": 1 compressed"), "{out}");
    assert!(
        e.data
            .join("frontend/1.37.11/assets/index-abc.js.br")
            .is_file()
    );

    let missing = e.root.join("nowhere");
    let err = fails(
        &e,
        &[
            "frontend",
            "precompress",
            "--frontend-dir",
            missing.to_str().unwrap(),
        ],
        None,
    );
    assert!(err.contains("nowhere"), "{err}");
}

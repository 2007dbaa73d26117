//! Nobody can lock anybody out. Failed sign-ins slow down the address they come from, for
//! that account and (more loosely) for all accounts, with growing delays; the right password
//! from any other address always works. Clients here connect from different loopback
//! addresses (127.0.0.2, 127.0.0.3, …), which Linux routes on `lo`.

use crate::helpers;

use std::net::IpAddr;
use std::time::Duration;

use helpers::*;
use reqwest::Method;

const VICTIM: &str = "user002";

/// A client whose connections come from `ip`.
fn from(ip: [u8; 4]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .local_address(IpAddr::from(ip))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn login(app: &TestApp, c: &reqwest::Client, user: &str, password: &str) -> Resp {
    TestApp::send(c.post(format!("{}/login", app.base)).form(&[
        ("username", user),
        ("password", password),
        ("next", ""),
    ]))
    .await
}

async fn basic(app: &TestApp, c: &reqwest::Client, user: &str, password: &str) -> Resp {
    TestApp::send(
        c.request(Method::GET, format!("{}/api/settings", app.base))
            .basic_auth(user, Some(password)),
    )
    .await
}

fn retry_after(r: &Resp) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a numeric Retry-After")
}

#[tokio::test]
async fn ten_wrong_passwords_from_one_address_lock_nobody_else_out() {
    let app = spawn_app_with(|s| s.login_delay = Duration::from_secs(60)).await;
    let attacker = from([127, 0, 0, 2]);
    let participant = from([127, 0, 0, 3]);
    let mut refused = 0;
    for i in 0..12 {
        let r = if i % 2 == 0 {
            login(&app, &attacker, VICTIM, "guess").await
        } else {
            basic(&app, &attacker, VICTIM, "guess").await
        };
        match r.status.as_u16() {
            401 => {}
            429 => {
                refused += 1;
                assert!(retry_after(&r) >= 1);
            }
            other => panic!("{other}"),
        }
    }
    assert!(refused > 0, "the attacker is slowed down");
    // Even with the right password, and under another spelling of the name, the attacker's
    // address waits.
    assert_eq!(login(&app, &attacker, VICTIM, PASSWORD).await.status, 429);
    assert_eq!(login(&app, &attacker, "USER002", "guess").await.status, 429);

    // The participant, from their own seat, signs in at once: the form and Basic alike.
    let r = login(&app, &participant, VICTIM, PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(
        basic(&app, &participant, VICTIM, PASSWORD).await.status,
        200
    );
    // So does the instructor, and the attacker's address for another account.
    assert_eq!(basic(&app, &attacker, ADMIN, PASSWORD).await.status, 200);
}

#[tokio::test]
async fn parallel_guesses_cannot_slip_past_the_check() {
    let app = spawn_app_with(|s| {
        s.login_max_failures = 5;
        s.login_delay = Duration::from_secs(60);
    })
    .await;
    let attacker = from([127, 0, 0, 4]);
    let guesses = (0..30).map(|i| {
        let attacker = attacker.clone();
        let app = &app;
        async move { basic(app, &attacker, VICTIM, &format!("guess {i}")).await }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let checked = answers.iter().filter(|r| r.status == 401).count();
    let refused = answers.iter().filter(|r| r.status == 429).count();
    assert_eq!(
        (checked, refused),
        (5, 25),
        "only the free allowance is checked, however many arrive at once"
    );
}

#[tokio::test]
async fn one_address_trying_many_accounts_is_slowed_down_but_not_the_room() {
    // Two free failures per account, twenty per address.
    let app = spawn_app_with(|s| {
        s.login_max_failures = 2;
        s.login_delay = Duration::from_secs(60);
    })
    .await;
    let sprayer = from([127, 0, 0, 5]);
    for i in 0..20 {
        let r = login(&app, &sprayer, &format!("user{:03}", 100 + i / 2), "guess").await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    let r = login(&app, &sprayer, "user001", PASSWORD).await;
    assert_eq!(r.status, 429, "a fresh account name does not help");
    assert!(retry_after(&r) >= 1);
    let neighbour = from([127, 0, 0, 6]);
    assert_eq!(
        login(&app, &neighbour, "user001", PASSWORD).await.status,
        303
    );
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_ignored() {
    // No proxy is trusted: a client cannot pick its own address to get a fresh allowance.
    let app = spawn_app_with(|s| {
        s.login_max_failures = 3;
        s.login_delay = Duration::from_secs(60);
    })
    .await;
    let c = from([127, 0, 0, 7]);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = TestApp::send(
            c.request(Method::GET, format!("{}/api/settings", app.base))
                .basic_auth(VICTIM, Some("guess"))
                .header("X-Forwarded-For", format!("198.51.100.{i}"))
                .header("Forwarded", format!("for=203.0.113.{i}")),
        )
        .await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, vec![401, 401, 401, 429, 429, 429]);
}

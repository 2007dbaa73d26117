//! The cross-site check behind a proxy: the public origin (`DOMAIN`) is this server's own,
//! whatever `Host` the proxy sends; a forwarded host counts only from a trusted proxy.

use crate::helpers;

use helpers::*;
use reqwest::Method;

async fn post_with(app: &TestApp, headers: &[(&str, &str)]) -> u16 {
    let mut rb = app
        .request(Method::POST, "/api/settings/Comfy.X")
        .basic_auth("user001", Some(PASSWORD))
        .body("1");
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    TestApp::send(rb).await.status.as_u16()
}

#[tokio::test]
async fn the_public_domain_is_accepted_as_origin_and_nothing_else_is() {
    let app = spawn_app_with(|s| s.domain = Some("workshop.example".into())).await;
    // A proxy that sends its upstream as Host (nginx's default `Host $proxy_host`).
    let upstream = [("Host", "127.0.0.1:8188")];
    assert_eq!(
        post_with(&app, &[upstream[0], ("Origin", "https://workshop.example")]).await,
        200
    );
    assert_eq!(
        post_with(&app, &[upstream[0], ("Origin", "https://evil.example")]).await,
        403
    );
    assert_eq!(
        post_with(
            &app,
            &[
                upstream[0],
                ("Origin", "https://workshop.example.evil.example")
            ]
        )
        .await,
        403
    );
    let refused = app
        .ws_with(
            "/ws?clientId=x",
            &[
                (
                    "authorization",
                    "Basic dXNlcjAwMTpjb3JyZWN0IGhvcnNlIGJhdHRlcnk=",
                ),
                ("origin", "https://evil.example"),
            ],
        )
        .await;
    assert!(refused.is_err());
    let ok = app
        .ws_with(
            "/ws?clientId=x",
            &[
                (
                    "authorization",
                    "Basic dXNlcjAwMTpjb3JyZWN0IGhvcnNlIGJhdHRlcnk=",
                ),
                ("origin", "https://workshop.example"),
            ],
        )
        .await;
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[tokio::test]
async fn a_forwarded_host_counts_only_from_a_trusted_proxy() {
    // Nobody trusted: a client naming its own "forwarded host" gains nothing.
    let app = spawn_app().await;
    let forged = [
        ("Origin", "http://evil.example"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("Forwarded", "host=evil.example;proto=http"),
    ];
    assert_eq!(post_with(&app, &forged).await, 403);
    // Trusting the test client's address (as a proxy), the same headers are believed.
    let trusting = spawn_app_with(|s| {
        s.trusted_proxies = comfyume_gateway::proxy::parse_list("127.0.0.1").unwrap();
    })
    .await;
    assert_eq!(post_with(&trusting, &forged[..3]).await, 200);
    assert_eq!(
        post_with(
            &trusting,
            &[
                ("Origin", "https://evil.example"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Forwarded-Proto", "http")
            ]
        )
        .await,
        403,
        "the forwarded scheme must match too"
    );
}

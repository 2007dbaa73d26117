mod helpers;
#[tokio::test]
async fn smoke() {
    let app = helpers::spawn_app().await;
    let r = app.get("user001", "/api/system_stats").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn tmp_fail() {
    if std::env::var("KLM_TMP_FAIL").is_err() { return; }
    let slice = klm_testkit::Cluster::shared().await.slice("tmp-fail", 1).await;
    let _p = slice.spawn("/bin/sh", &["-c", "echo hello from child; sleep 100"], &[]).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    panic!("deliberate");
}

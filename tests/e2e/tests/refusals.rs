//! Triggers that would reach beyond kata-deploy are refused before the run touches anything
//! (issue 11): a `helm-release` built from another chart (an umbrella chart that carries
//! kata-deploy as a subchart, which `helm upgrade <release> <kata-deploy chart>` would strip of
//! everything else), and verification templates that are not pinned to `${NODE}` or run
//! privileged. Each run ends `Failed` with a message naming the problem; no helm call is made and
//! no node is cordoned or labelled.
mod product;

use base64::Engine;
use klm_protocol::RunPhase;
use klm_protocol::keys::trigger;
use product::Product;
use std::path::Path;

/// Triggers the `pairs` (on top of a target version), waits for the run to end and returns
/// its message; then clears the annotations for the next case.
async fn refused_with(p: &Product, pairs: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut ann: Vec<(&str, Option<&str>)> = vec![(trigger::TARGET_VERSION, Some("3.28.0"))];
    ann.extend(pairs.iter().map(|(k, v)| (*k, Some(*v))));
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&ann).await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{pairs:?}: {run:#?}");
    assert!(
        run.plan
            .iter()
            .all(|n| run.nodes.get(n).is_none_or(|r| r.status.is_none())),
        "{pairs:?}: no node got a turn: {run:#?}"
    );
    let clear: Vec<(&str, Option<&str>)> = ann.iter().map(|(k, _)| (*k, None)).collect();
    p.annotate(&clear).await?;
    Ok(run.message)
}

/// Writes a chart `platform` at `dir`: one ConfigMap of its own, and the fixture kata-deploy
/// chart as a subchart whose DaemonSet selects no node (nothing runs; the release is what
/// matters).
fn umbrella_chart(dir: &Path) -> anyhow::Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/charts/kata-deploy");
    let sub = dir.join("charts/kata-deploy");
    copy_dir(&fixture, &sub)?;
    std::fs::write(
        dir.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 1.0.0\nappVersion: \"1.0.0\"\n\
         dependencies:\n  - name: kata-deploy\n    version: 0.0.0\n",
    )?;
    std::fs::write(
        dir.join("values.yaml"),
        "kata-deploy:\n  nodeSelector:\n    klm.test/no-such-node: \"true\"\n",
    )?;
    std::fs::create_dir_all(dir.join("templates"))?;
    std::fs::write(
        dir.join("templates/settings.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: platform-settings\ndata:\n  owner: platform\n",
    )?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_another_chart_is_refused_and_nothing_changes() -> anyhow::Result<()> {
    let p = Product::start("otherchart", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let chart = p.slice.dir().join("platform-chart");
    umbrella_chart(&chart)?;
    // Its own namespace: the subchart's DaemonSet is named like the slice's kata-deploy one.
    let ns = p.slice.namespace();
    p.slice
        .helm(&["install", "platform", chart.to_str().unwrap(), "-n", &ns])
        .await?;
    let metadata = || async {
        let out = p
            .slice
            .helm(&["get", "metadata", "platform", "-n", &ns, "-o", "json"])
            .await?;
        anyhow::Ok(serde_json::from_str::<serde_json::Value>(&out)?)
    };
    let platform_before = metadata().await?;
    assert_eq!(platform_before["chart"], "platform", "{platform_before}");
    let kata_before = p.release().await?;

    let message = refused_with(
        &p,
        &[
            (trigger::HELM_RELEASE, "platform"),
            (trigger::HELM_NAMESPACE, ns.as_str()),
        ],
    )
    .await?;
    assert!(
        message.contains("built from chart \"platform\", not \"kata-deploy\""),
        "{message}"
    );
    assert!(
        message.contains("helm-release"),
        "the message says what to fix: {message}"
    );

    let platform_after = metadata().await?;
    assert_eq!(
        (&platform_after["revision"], &platform_after["chart"]),
        (&platform_before["revision"], &platform_before["chart"]),
        "the umbrella release was not upgraded"
    );
    assert_eq!(p.release().await?, kata_before, "kata-deploy untouched");
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(p.slice.client(), &ns);
    assert!(
        cms.get_opt("platform-settings").await?.is_some(),
        "the umbrella's own objects are still there"
    );
    assert_eq!(
        p.node_labels("node-1").await?,
        (None, None),
        "no node touched"
    );
    p.assert_safe(&[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_or_privileged_verification_templates_are_refused_before_any_node()
-> anyhow::Result<()> {
    let p = Product::start("badtemplate", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let good = p.slice.verification_pod_template();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let unpinned = good.replace("  nodeName: ${NODE}\n", "");
    assert_ne!(unpinned, good, "the template pins by nodeName");
    let elsewhere = good.replace("nodeName: ${NODE}", "nodeName: some-other-node");
    let privileged = format!("{good}    securityContext:\n      privileged: true\n");
    let host_path = format!(
        "{good}    volumeMounts:\n    - {{name: root, mountPath: /host}}\n  volumes:\n  - {{name: root, hostPath: {{path: /}}}}\n"
    );
    let kata_before = p.release().await?;
    let cases = [
        (unpinned, "not pinned to the node being verified"),
        (
            elsewhere,
            "spec.nodeName is \"some-other-node\"; it may only be ${NODE}",
        ),
        (privileged, "is privileged"),
        (host_path, "hostPath"),
    ];
    for (template, needle) in cases {
        let message = refused_with(&p, &[(trigger::VERIFICATION_POD, &b64(&template))]).await?;
        assert!(message.contains(needle), "{needle}: {message}");
    }
    assert_eq!(p.release().await?, kata_before, "no helm call was made");
    assert_eq!(
        p.node_labels("node-1").await?,
        (None, None),
        "no node touched"
    );
    p.assert_safe(&[]).await?;
    Ok(())
}

//! Reads this node's turn from its own Node: the grant the coordinator writes there
//! (`klm_protocol::grant`). Pure: the driver feeds it what the Node watch delivered.
use k8s_openapi::api::core::v1::Node;
pub use klm_protocol::grant::{Grant as Assignment, Reading, TurnKey};

/// What our Node says about our turn (`None`: the Node is gone, which is no turn).
pub fn read_node(node: Option<&Node>) -> Reading {
    let annotation = node
        .and_then(|n| n.metadata.annotations.as_ref())
        .and_then(|a| a.get(klm_protocol::grant::ANNOTATION));
    klm_protocol::grant::read(annotation.map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;
    use klm_protocol::TurnKind;
    use klm_protocol::params::RunParams;
    use klm_protocol::run::ReleaseState;

    fn grant(run: &str, kind: TurnKind) -> Assignment {
        Assignment {
            run_id: run.into(),
            kind,
            slot: 0,
            granted_at_ms: 5,
            target_version: "3.28.0".into(),
            params: RunParams::default(),
            release: ReleaseState::default(),
            cancel_requested: false,
            issuer: String::new(),
        }
    }

    fn node(annotation: Option<&str>) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.annotations = annotation.map(|a| {
            [
                (klm_protocol::grant::ANNOTATION.to_string(), a.to_string()),
                ("unrelated".to_string(), "x".to_string()),
            ]
            .into()
        });
        n
    }

    /// Absent, garbage, our run's turn, another run's turn, a revoked turn (the annotation
    /// removed) and a deleted Node: only a readable grant is a turn; garbage is reported and
    /// starts nothing.
    #[test]
    fn the_grant_on_our_node_is_our_turn_and_nothing_else_is() {
        let ours = grant("r1", TurnKind::Upgrade);
        let restore = grant("r1", TurnKind::Restore);
        let other = grant("r2", TurnKind::Upgrade);
        let cases: Vec<(&str, Option<Node>, Option<TurnKey>, bool)> = vec![
            ("no annotation", Some(node(None)), None, false),
            ("no annotations at all", Some(Node::default()), None, false),
            ("garbage", Some(node(Some("{not json"))), None, true),
            (
                "not a grant",
                Some(node(Some(r#"{"runId":"r1"}"#))),
                None,
                true,
            ),
            (
                "our upgrade turn",
                Some(node(Some(&ours.to_json()))),
                Some(ours.key()),
                false,
            ),
            (
                "our restore turn",
                Some(node(Some(&restore.to_json()))),
                Some(restore.key()),
                false,
            ),
            (
                "another run",
                Some(node(Some(&other.to_json()))),
                Some(other.key()),
                false,
            ),
            ("revoked: removed", Some(node(None)), None, false),
            ("Node deleted", None, None, false),
        ];
        for (what, n, want, unusable) in cases {
            match (read_node(n.as_ref()), want) {
                (Reading::Turn(a), Some(k)) => assert_eq!(a.key(), k, "{what}"),
                (Reading::Idle, None) => assert!(!unusable, "{what}: garbage read as no grant"),
                (Reading::Unusable(m), None) => {
                    assert!(unusable, "{what}: {m}");
                    assert!(m.contains(klm_protocol::grant::ANNOTATION), "{what}: {m}");
                }
                (got, want) => panic!("{what}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn the_grant_carries_the_cancel_and_the_slot() {
        let mut g = grant("r1", TurnKind::Upgrade);
        g.slot = 3;
        g.cancel_requested = true;
        let Reading::Turn(a) = read_node(Some(&node(Some(&g.to_json())))) else {
            panic!("a turn")
        };
        assert_eq!((a.slot, a.cancel_requested), (3, true));
    }
}

//! Minimized inputs of the bugs the hostile-caller run found, replayed through the same
//! oracles ([`World::run`]) with the exact status each must get.

use std::collections::HashMap;

use containerd_api::containerd::services::diff::v1 as dpb;
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::{Descriptor, Mount};
use tonic::Code;

use super::block_on;
use super::input::Req;
use super::world::{Answer, World};

fn prepare(key: &str) -> Req {
    Req::Prepare(pb::PrepareSnapshotRequest {
        snapshotter: "erofs-rs".into(),
        key: key.into(),
        parent: String::new(),
        labels: HashMap::new(),
    })
}

/// Runs `req`, which must end with `code`; returns the answer of a success.
async fn expect(w: &mut World, what: &str, req: Req, code: Code) -> Option<Answer> {
    let out = w
        .run(req)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}\nlast requests:\n{}", w.trace()));
    let got = out.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
    assert_eq!(got, code, "{what}: {out:?}");
    out.ok()
}

#[test]
fn regressions() {
    testsuite::require_root().unwrap();
    testsuite::with_timeout(std::time::Duration::from_secs(120), || {
        block_on(async {
            let mut w = World::start(0).await.expect("starting the daemon");
            let Some(Answer::Mounts(mounts)) =
                expect(&mut w, "Prepare", prepare("a"), Code::Ok).await
            else {
                panic!("Prepare answered no mounts")
            };

            // Seed 0x2, request 220: an error message that quotes a 188 KB media type went
            // out whole in the grpc-message header, past the client's header list limit, so
            // the caller got a transport error (ResourceExhausted, "h2 protocol error")
            // instead of the answer. Messages are bounded now.
            let d = Descriptor {
                media_type: "y".repeat(188_481),
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 1,
                annotations: Default::default(),
            };
            expect(
                &mut w,
                "Apply with a 188 KB media type",
                Req::Apply(
                    dpb::ApplyRequest {
                        diff: Some(d),
                        mounts: mounts.clone(),
                        payloads: Default::default(),
                        sync_fs: false,
                    },
                    None,
                ),
                Code::Unimplemented,
            )
            .await;

            // Seed 0x3, request 1704: a Diff with source_date_epoch nanos of i32::MAX
            // panicked the tar writer (`1e9 - nsec`), and the request ended Internal. Now
            // an invalid protobuf timestamp is InvalidArgument.
            let Some(Answer::Mounts(view)) = expect(
                &mut w,
                "View of nothing",
                Req::View(pb::ViewSnapshotRequest {
                    snapshotter: "erofs-rs".into(),
                    key: "empty-view".into(),
                    parent: String::new(),
                    labels: HashMap::new(),
                }),
                Code::Ok,
            )
            .await
            else {
                panic!("View answered no mounts")
            };
            for (seconds, nanos) in [(0, i32::MAX), (0, 1_000_000_000), (0, -1), (i64::MIN, 0)] {
                expect(
                    &mut w,
                    &format!("Diff with source_date_epoch {seconds}s {nanos}ns"),
                    Req::Diff(
                        dpb::DiffRequest {
                            left: view.clone(),
                            right: mounts.clone(),
                            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                            r#ref: String::new(),
                            labels: Default::default(),
                            source_date_epoch: Some(prost_types::Timestamp { seconds, nanos }),
                        },
                        None,
                    ),
                    Code::InvalidArgument,
                )
                .await;
            }

            // Seeds 0x2, 0x4, 0x5: a Diff whose upper (or lower) is a read-only bind of a
            // snapshot that has no layer (a parentless view; an active snapshot's directory
            // with `ro`) ended Internal ("opening .../layer.erofs: No such file"). Now it is
            // Unimplemented, so containerd's next differ reads the mounts.
            let mut active_ro = mounts.clone();
            active_ro[0].options = vec!["ro".into(), "rbind".into()];
            // An active snapshot with a parent: a parentless one is empty below and is
            // skipped as a lower.
            expect(&mut w, "Prepare base", prepare("base"), Code::Ok).await;
            let commit = Req::Commit(pb::CommitSnapshotRequest {
                snapshotter: "erofs-rs".into(),
                name: "base-c".into(),
                key: "base".into(),
                labels: HashMap::new(),
                parent: String::new(),
            });
            expect(&mut w, "Commit base", commit, Code::Ok).await;
            let mut child = prepare("child");
            if let Req::Prepare(p) = &mut child {
                p.parent = "base-c".into();
            }
            let Some(Answer::Mounts(child)) =
                expect(&mut w, "Prepare child", child, Code::Ok).await
            else {
                panic!("Prepare answered no mounts")
            };
            let id = w.env.id_of_mounts(&child).unwrap();
            let child_ro = vec![Mount {
                r#type: "bind".into(),
                source: w.env.snapshot_dir(id).join("fs").display().to_string(),
                target: String::new(),
                options: vec!["ro".into(), "rbind".into()],
            }];
            for (what, left, right) in [
                (
                    "a parentless view as the upper",
                    mounts.clone(),
                    view.clone(),
                ),
                (
                    "an active snapshot mounted ro as the upper",
                    view.clone(),
                    active_ro.clone(),
                ),
                (
                    "an active snapshot mounted ro as a lower",
                    child_ro,
                    mounts.clone(),
                ),
            ] {
                expect(
                    &mut w,
                    &format!("Diff with {what}"),
                    Req::Diff(
                        dpb::DiffRequest {
                            left,
                            right,
                            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                            r#ref: String::new(),
                            labels: Default::default(),
                            source_date_epoch: None,
                        },
                        None,
                    ),
                    Code::Unimplemented,
                )
                .await;
            }

            expect(&mut w, "Cleanup", Req::Cleanup, Code::Ok).await;
            w.check_agreement(true).await.expect("store and disk agree");
            w.remove_all().await.expect("removing everything");
            w.env.stop().expect("stopping the daemon");
        })
    });
}

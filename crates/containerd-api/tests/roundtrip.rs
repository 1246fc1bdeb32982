//! Wire-format checks: the generated types must use containerd's field
//! numbers and wire types, so a wrong number in a .proto file fails here.

use std::collections::HashMap;

use containerd_api::containerd::services::content::v1 as content;
use containerd_api::containerd::services::diff::v1 as diff;
use containerd_api::containerd::services::snapshots::v1 as snapshots;
use containerd_api::containerd::types::{Descriptor, Mount};
use containerd_api::prost::Message;
use containerd_api::prost_types::{Any, Timestamp};

const VARINT: u8 = 0;
const LEN: u8 = 2;

/// Splits one encoded message into its top-level fields as
/// (field number, wire type, payload bytes), in wire order.
fn fields(mut buf: &[u8]) -> Vec<(u32, u8, Vec<u8>)> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (byte, rest) = buf.split_first().expect("truncated varint");
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
        }
        panic!("varint too long");
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let number = u32::try_from(key >> 3).expect("field number");
        let wire = (key & 7) as u8;
        let payload = match wire {
            VARINT => {
                let start = buf;
                varint(&mut buf);
                start[..start.len() - buf.len()].to_vec()
            }
            LEN => {
                let len = usize::try_from(varint(&mut buf)).expect("length");
                let (payload, rest) = buf.split_at(len);
                buf = rest;
                payload.to_vec()
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((number, wire, payload));
    }
    out
}

/// The (field number, wire type) pairs of an encoded message.
fn layout(buf: &[u8]) -> Vec<(u32, u8)> {
    fields(buf).into_iter().map(|(n, w, _)| (n, w)).collect()
}

fn payload_of(buf: &[u8], number: u32) -> Vec<u8> {
    fields(buf)
        .into_iter()
        .find(|(n, _, _)| *n == number)
        .unwrap_or_else(|| panic!("field {number} missing"))
        .2
}

fn mount() -> Mount {
    Mount {
        r#type: "erofs".into(),
        source: "/var/lib/layer.erofs".into(),
        target: "/".into(),
        options: vec!["ro".into(), "loop".into()],
    }
}

#[test]
fn commit_snapshot_request_parent_is_field_5() {
    let req = snapshots::CommitSnapshotRequest {
        snapshotter: "erofs".into(),
        name: "committed".into(),
        key: "active".into(),
        labels: HashMap::from([("k".into(), "v".into())]),
        parent: "new-parent".into(),
    };
    let bytes = req.encode_to_vec();
    assert_eq!(
        layout(&bytes),
        [(1, LEN), (2, LEN), (3, LEN), (4, LEN), (5, LEN)]
    );
    // Tag byte of field 5, length-delimited: (5 << 3) | 2 = 0x2a.
    let tag = bytes
        .windows(2 + "new-parent".len())
        .position(|w| w[0] == 0x2a && w[1] == 10 && &w[2..] == b"new-parent");
    assert!(tag.is_some(), "parent not encoded as field 5: {bytes:02x?}");
    assert_eq!(payload_of(&bytes, 5), b"new-parent");
    // A map entry is a nested message {1: key, 2: value}.
    assert_eq!(layout(&payload_of(&bytes, 4)), [(1, LEN), (2, LEN)]);

    let back = snapshots::CommitSnapshotRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(back, req);

    // What an older containerd sends (no field 5) decodes with an empty parent.
    let old = snapshots::CommitSnapshotRequest::decode(&b"\x12\x01n\x1a\x01k"[..]).unwrap();
    assert_eq!((old.name.as_str(), old.key.as_str()), ("n", "k"));
    assert!(old.parent.is_empty());
}

#[test]
fn apply_request_fields() {
    let req = diff::ApplyRequest {
        diff: Some(Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: "sha256:00".into(),
            size: 1234,
            annotations: HashMap::from([("a".into(), "b".into())]),
        }),
        mounts: vec![mount()],
        payloads: HashMap::from([(
            "p".into(),
            Any {
                type_url: "example/x".into(),
                value: vec![1, 2, 3],
            },
        )]),
        sync_fs: true,
    };
    let bytes = req.encode_to_vec();
    // Tags 0x0a, 0x12, 0x1a, 0x20.
    assert_eq!(layout(&bytes), [(1, LEN), (2, LEN), (3, LEN), (4, VARINT)]);
    assert_eq!(bytes[0], 0x0a);
    assert!(bytes.ends_with(&[0x20, 0x01]), "sync_fs not field 4 varint");

    let desc = payload_of(&bytes, 1);
    assert_eq!(
        layout(&desc),
        [(1, LEN), (2, LEN), (3, VARINT), (5, LEN)],
        "Descriptor: annotations is field 5, field 4 unused"
    );
    assert_eq!(
        layout(&payload_of(&bytes, 2)),
        [(1, LEN), (2, LEN), (3, LEN), (4, LEN), (4, LEN)],
        "Mount: type, source, target, options"
    );
    // payloads map entry: {1: key, 2: Any{1: type_url, 2: value}}.
    let entry = payload_of(&bytes, 3);
    assert_eq!(layout(&entry), [(1, LEN), (2, LEN)]);
    assert_eq!(layout(&payload_of(&entry, 2)), [(1, LEN), (2, LEN)]);

    let back = diff::ApplyRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(back, req);
}

#[test]
fn diff_request_and_response_fields() {
    let req = diff::DiffRequest {
        left: vec![mount()],
        right: vec![mount()],
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        r#ref: "ingest-1".into(),
        labels: HashMap::from([("l".into(), "v".into())]),
        source_date_epoch: Some(Timestamp {
            seconds: 1,
            nanos: 0,
        }),
    };
    let bytes = req.encode_to_vec();
    assert_eq!(
        layout(&bytes),
        [(1, LEN), (2, LEN), (3, LEN), (4, LEN), (5, LEN), (6, LEN)]
    );
    assert_eq!(payload_of(&bytes, 4), b"ingest-1");
    assert_eq!(diff::DiffRequest::decode(bytes.as_slice()).unwrap(), req);

    let resp = diff::DiffResponse {
        diff: Some(Descriptor::default()),
    };
    // DiffResponse.diff is field 3: tag 0x1a.
    assert_eq!(resp.encode_to_vec(), [0x1a, 0x00]);
}

#[test]
fn snapshot_info_and_kind() {
    let info = snapshots::Info {
        name: "n".into(),
        parent: "p".into(),
        kind: snapshots::Kind::Committed as i32,
        created_at: Some(Timestamp::default()),
        updated_at: Some(Timestamp::default()),
        labels: HashMap::from([("a".into(), "b".into())]),
    };
    let bytes = info.encode_to_vec();
    assert_eq!(
        layout(&bytes),
        [
            (1, LEN),
            (2, LEN),
            (3, VARINT),
            (4, LEN),
            (5, LEN),
            (6, LEN)
        ]
    );
    assert_eq!(payload_of(&bytes, 3), [3]);
    let back = snapshots::Info::decode(bytes.as_slice()).unwrap();
    assert_eq!(back.kind(), snapshots::Kind::Committed);

    let names = [
        (snapshots::Kind::Unknown, 0, "UNKNOWN"),
        (snapshots::Kind::View, 1, "VIEW"),
        (snapshots::Kind::Active, 2, "ACTIVE"),
        (snapshots::Kind::Committed, 3, "COMMITTED"),
    ];
    for (kind, value, name) in names {
        assert_eq!(kind as i32, value);
        assert_eq!(kind.as_str_name(), name);
    }

    let update = snapshots::UpdateSnapshotRequest {
        snapshotter: "erofs".into(),
        info: Some(snapshots::Info::default()),
        update_mask: Some(containerd_api::prost_types::FieldMask {
            paths: vec!["labels.a".into()],
        }),
    };
    assert_eq!(
        layout(&update.encode_to_vec()),
        [(1, LEN), (2, LEN), (3, LEN)]
    );

    let usage = snapshots::UsageResponse {
        size: 4096,
        inodes: 7,
    };
    assert_eq!(layout(&usage.encode_to_vec()), [(1, VARINT), (2, VARINT)]);
}

#[test]
fn content_write_fields_and_actions() {
    let req = content::WriteContentRequest {
        action: content::WriteAction::Commit as i32,
        r#ref: "r".into(),
        total: 10,
        expected: "sha256:00".into(),
        offset: 5,
        data: vec![0; 5],
        labels: HashMap::from([("a".into(), "b".into())]),
    };
    let bytes = req.encode_to_vec();
    assert_eq!(
        layout(&bytes),
        [
            (1, VARINT),
            (2, LEN),
            (3, VARINT),
            (4, LEN),
            (5, VARINT),
            (6, LEN),
            (7, LEN)
        ]
    );
    assert_eq!(payload_of(&bytes, 1), [2]);

    let resp = content::WriteContentResponse {
        action: content::WriteAction::Stat as i32,
        started_at: Some(Timestamp::default()),
        updated_at: Some(Timestamp::default()),
        offset: 1,
        total: 2,
        digest: "sha256:00".into(),
    };
    // action = STAT is the default and is not sent.
    assert_eq!(
        layout(&resp.encode_to_vec()),
        [(2, LEN), (3, LEN), (4, VARINT), (5, VARINT), (6, LEN)]
    );

    for (action, value, name) in [
        (content::WriteAction::Stat, 0, "STAT"),
        (content::WriteAction::Write, 1, "WRITE"),
        (content::WriteAction::Commit, 2, "COMMIT"),
    ] {
        assert_eq!(action as i32, value);
        assert_eq!(action.as_str_name(), name);
    }

    let read = content::ReadContentRequest {
        digest: "sha256:00".into(),
        offset: 1,
        size: 2,
    };
    assert_eq!(
        layout(&read.encode_to_vec()),
        [(1, LEN), (2, VARINT), (3, VARINT)]
    );

    let status = content::Status {
        started_at: Some(Timestamp::default()),
        updated_at: Some(Timestamp::default()),
        r#ref: "r".into(),
        offset: 1,
        total: 2,
        expected: "sha256:00".into(),
    };
    assert_eq!(
        layout(&status.encode_to_vec()),
        [
            (1, LEN),
            (2, LEN),
            (3, LEN),
            (4, VARINT),
            (5, VARINT),
            (6, LEN)
        ]
    );

    let info = content::Info {
        digest: "sha256:00".into(),
        size: 3,
        created_at: Some(Timestamp::default()),
        updated_at: Some(Timestamp::default()),
        labels: HashMap::from([("a".into(), "b".into())]),
    };
    assert_eq!(
        layout(&info.encode_to_vec()),
        [(1, LEN), (2, VARINT), (3, LEN), (4, LEN), (5, LEN)]
    );
}

#[test]
fn grpc_service_names() {
    assert_eq!(
        snapshots::snapshots_server::SERVICE_NAME,
        "containerd.services.snapshots.v1.Snapshots"
    );
    assert_eq!(
        diff::diff_server::SERVICE_NAME,
        "containerd.services.diff.v1.Diff"
    );
    assert_eq!(
        content::content_server::SERVICE_NAME,
        "containerd.services.content.v1.Content"
    );
}

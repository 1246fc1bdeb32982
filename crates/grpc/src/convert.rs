//! Proto messages to and from core types.

use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types;
use snapshotter::store::Timestamp;
use snapshotter::{Info, Kind, Mount};

/// Core mount to proto.
pub fn mount(m: Mount) -> types::Mount {
    types::Mount {
        r#type: m.kind,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

/// Proto mount to core.
pub fn mount_from(m: types::Mount) -> Mount {
    Mount {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

fn ts(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: t.nanos as i32,
    }
}

/// Core kind to proto.
pub fn kind(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// Core info to proto.
pub fn info(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind(i.kind) as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

/// Proto info to core (for Update: only name and labels matter).
pub fn info_from(i: pb::Info) -> Info {
    Info {
        name: i.name,
        parent: i.parent,
        kind: match pb::Kind::try_from(i.kind) {
            Ok(pb::Kind::View) => Kind::View,
            Ok(pb::Kind::Committed) => Kind::Committed,
            _ => Kind::Active,
        },
        labels: i.labels.into_iter().collect(),
        created: Timestamp::default(),
        updated: Timestamp::default(),
    }
}

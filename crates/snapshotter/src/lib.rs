//! containerd snapshotter core (skeleton).

//! Mounts: the pure description of what containerd is told to mount ([`spec`]), and the
//! mounting the daemon does itself in host mode ([`mounter`], [`table`], [`probe`]), and a
//! mounter that only records ([`recording`]) for tests without root.

pub mod mounter;
pub mod probe;
pub mod recording;
pub mod spec;
pub mod table;

pub use mounter::{Mounter, SystemMounter};
pub use recording::{MountEvent, RecordingMounter};
pub use spec::Mount;

//! Mounts: the pure description of what containerd is told to mount ([`spec`]), the mounting
//! the daemon does itself in host mode ([`mounter`], [`table`], [`idmap`]), what the kernel can
//! do ([`probe`]), and a mounter that only records ([`recording`]) for tests without root.

pub mod idmap;
pub mod mounter;
pub mod probe;
pub mod recording;
pub mod spec;
pub mod table;

pub use idmap::IdMap;
pub use mounter::{Mounter, OpenImage, SystemMounter};
pub use recording::{MountEvent, RecordingMounter};
pub use spec::Mount;

//! Mounts: the pure description of what containerd is told to mount ([`spec`]), and the
//! mounting the daemon does itself in host mode ([`mounter`], [`table`], [`probe`]).

pub mod mounter;
pub mod probe;
pub mod spec;
pub mod table;

pub use mounter::{Mounter, SystemMounter};
pub use spec::Mount;

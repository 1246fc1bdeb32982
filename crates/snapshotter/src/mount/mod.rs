//! Mounts: the pure description of what containerd is told to mount ([`spec`]), the mounting
//! the daemon does itself in host mode ([`mounter`], [`table`], [`idmap`]), and what the
//! kernel can do ([`probe`]).

pub mod idmap;
pub mod mounter;
pub mod probe;
pub mod spec;
pub mod table;

pub use idmap::IdMap;
pub use mounter::{Mounter, SystemMounter};
pub use spec::Mount;

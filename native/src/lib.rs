pub mod datapath;
#[doc(hidden)]
pub mod fuzzing;
pub mod offload;
pub mod replay;
pub mod session;
pub mod wire;

mod py;

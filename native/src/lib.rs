pub mod datapath;
pub mod offload;
pub mod replay;
pub mod session;
pub mod wire;

mod py;

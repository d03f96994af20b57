//! Protobuf messages of the cleanroom gateway (built from `proto/cleanroom.proto`).

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cleanroom.v1.rs"));
}

pub use v1::StatementHandle;

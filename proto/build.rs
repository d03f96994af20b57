fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/cleanroom.proto");
    prost_build::compile_protos(&["proto/cleanroom.proto"], &["proto/"])
}

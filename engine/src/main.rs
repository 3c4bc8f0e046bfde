fn main() {
    eprintln!("twinvol-engine: not built yet");
    std::process::exit(2);
}

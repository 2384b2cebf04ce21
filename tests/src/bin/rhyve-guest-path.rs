//! `rhyve-guest-path NAME`: print the absolute path of a test guest image (bzimage, pvh).

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    match rhyve_tests::guest_path(&name) {
        Some(p) => println!("{p}"),
        None => {
            eprintln!(
                "usage: rhyve-guest-path NAME   (NAME: {})",
                rhyve_tests::GUEST_NAMES.join(", ")
            );
            std::process::exit(2);
        }
    }
}

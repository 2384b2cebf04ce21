//! Prints what bootdisk would boot from an image or directory:
//! `cargo run --release -p bootdisk --example probe -- IMAGE|DIR [ENTRY]`

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(target) = args.next() else {
        eprintln!("usage: probe IMAGE|DIR [ENTRY]");
        std::process::exit(2);
    };
    let opts = bootdisk::Options {
        entry: args.next(),
        ..Default::default()
    };
    let path = std::path::Path::new(&target);
    let start = Instant::now();
    let r = if path.is_dir() {
        bootdisk::find_boot_in_dir(path, &opts)
    } else {
        bootdisk::find_boot_in_image(path, &opts)
    };
    match r {
        Ok(s) => {
            println!("source:  {}", s.source);
            println!("title:   {}", s.title.as_deref().unwrap_or("-"));
            println!("kernel:  {} ({} bytes)", s.kernel_path, s.kernel.len());
            match (&s.initrd_path, &s.initrd) {
                (Some(p), Some(d)) => println!("initrd:  {p} ({} bytes)", d.len()),
                _ => println!("initrd:  -"),
            }
            println!("cmdline: {}", s.cmdline);
            println!("time:    {:?}", start.elapsed());
        }
        Err(e) => {
            eprintln!("probe: {target}: {e}");
            std::process::exit(1);
        }
    }
}

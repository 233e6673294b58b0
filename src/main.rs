//! The `ztund` command line.

fn main() {
    println!("ztund: under construction");
}

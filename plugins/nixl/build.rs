//! Compiles the C++ shim (NIXL's backend class over our C API) into the crate.
fn main() {
    for f in ["shim/plugin.cpp", "shim/nixl_abi.h", "shim/tcpx_nixl.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .file("shim/plugin.cpp")
        .std("c++17")
        // NIXL 1.5.1 is built with the C++11 string ABI; say so explicitly.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag("-fvisibility=hidden")
        .warnings(true)
        .extra_warnings(true)
        .flag("-Werror")
        .compile("tcpx_nixl_shim");
}

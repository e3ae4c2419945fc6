//! The Rust mirrors against the C header: compiles a tiny program with the
//! system `cc` that prints sizeof/offsetof from <linux/ethtool.h>.
//! Skips (with a message) when `cc` or the header (linux-libc-dev) is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use flowsteer::ethtool::sys::*;

const PROG: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/sockios.h>
#include <linux/ethtool.h>
#define S(t) printf("sizeof_%s %zu\n", #t, sizeof(struct t));
#define O(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f));
#define C(c) printf("%s %lu\n", #c, (unsigned long)(c));
int main(void) {
    S(ethtool_tcpip4_spec) S(ethtool_tcpip6_spec) S(ethtool_flow_ext)
    S(ethtool_rx_flow_spec) S(ethtool_rxnfc) S(ifreq)
    printf("sizeof_ethtool_flow_union %zu\n", sizeof(union ethtool_flow_union));
    O(ethtool_tcpip4_spec, ip4src) O(ethtool_tcpip4_spec, ip4dst) O(ethtool_tcpip4_spec, psrc)
    O(ethtool_tcpip4_spec, pdst) O(ethtool_tcpip4_spec, tos)
    O(ethtool_tcpip6_spec, ip6src) O(ethtool_tcpip6_spec, ip6dst) O(ethtool_tcpip6_spec, psrc)
    O(ethtool_tcpip6_spec, pdst) O(ethtool_tcpip6_spec, tclass)
    O(ethtool_flow_ext, h_dest) O(ethtool_flow_ext, vlan_etype) O(ethtool_flow_ext, vlan_tci)
    O(ethtool_flow_ext, data)
    O(ethtool_rx_flow_spec, flow_type) O(ethtool_rx_flow_spec, h_u) O(ethtool_rx_flow_spec, h_ext)
    O(ethtool_rx_flow_spec, m_u) O(ethtool_rx_flow_spec, m_ext) O(ethtool_rx_flow_spec, ring_cookie)
    O(ethtool_rx_flow_spec, location)
    O(ethtool_rxnfc, cmd) O(ethtool_rxnfc, flow_type) O(ethtool_rxnfc, data) O(ethtool_rxnfc, fs)
    O(ethtool_rxnfc, rule_cnt) O(ethtool_rxnfc, rule_locs)
    C(SIOCETHTOOL) C(ETHTOOL_SRXCLSRLINS) C(ETHTOOL_SRXCLSRLDEL) C(ETHTOOL_GRXCLSRLCNT)
    C(ETHTOOL_GRXCLSRLALL) C(TCP_V4_FLOW) C(TCP_V6_FLOW) C(RX_CLS_LOC_ANY) C(RX_CLS_LOC_SPECIAL)
    return 0;
}
"#;

fn c_values() -> Option<HashMap<String, u64>> {
    if !Path::new("/usr/include/linux/ethtool.h").exists() {
        eprintln!("SKIP: /usr/include/linux/ethtool.h missing (apt install linux-libc-dev)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("flowsteer-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, PROG).ok()?;
    let cc = match Command::new("cc").arg("-o").arg(&exe).arg(&src).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: no C compiler `cc`: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
    };
    assert!(
        cc.status.success(),
        "layout.c did not compile: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().expect("run layout program");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8(out.stdout).expect("utf8");
    Some(
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.parse().expect("number")))
            .collect(),
    )
}

#[test]
fn rust_mirrors_match_linux_ethtool_h() {
    let Some(c) = c_values() else { return };
    let want = |k: &str| {
        *c.get(k)
            .unwrap_or_else(|| panic!("C program did not print {k}"))
    };
    let checks: &[(&str, usize)] = &[
        ("sizeof_ethtool_flow_union", size_of::<EthtoolFlowUnion>()),
        ("sizeof_ethtool_flow_ext", size_of::<EthtoolFlowExt>()),
        (
            "sizeof_ethtool_rx_flow_spec",
            size_of::<EthtoolRxFlowSpec>(),
        ),
        ("sizeof_ethtool_rxnfc", size_of::<EthtoolRxnfc>()),
        ("sizeof_ifreq", size_of::<libc::ifreq>()),
        // The union's spec layouts we write by hand in tcp_ip4/tcp_ip6.
        ("sizeof_ethtool_tcpip4_spec", 16),
        ("ethtool_tcpip4_spec.ip4src", 0),
        ("ethtool_tcpip4_spec.ip4dst", 4),
        ("ethtool_tcpip4_spec.psrc", 8),
        ("ethtool_tcpip4_spec.pdst", 10),
        ("ethtool_tcpip4_spec.tos", 12),
        ("sizeof_ethtool_tcpip6_spec", 40),
        ("ethtool_tcpip6_spec.ip6src", 0),
        ("ethtool_tcpip6_spec.ip6dst", 16),
        ("ethtool_tcpip6_spec.psrc", 32),
        ("ethtool_tcpip6_spec.pdst", 34),
        ("ethtool_tcpip6_spec.tclass", 36),
        (
            "ethtool_flow_ext.h_dest",
            offset_of!(EthtoolFlowExt, h_dest),
        ),
        (
            "ethtool_flow_ext.vlan_etype",
            offset_of!(EthtoolFlowExt, vlan_etype),
        ),
        (
            "ethtool_flow_ext.vlan_tci",
            offset_of!(EthtoolFlowExt, vlan_tci),
        ),
        ("ethtool_flow_ext.data", offset_of!(EthtoolFlowExt, data)),
        (
            "ethtool_rx_flow_spec.flow_type",
            offset_of!(EthtoolRxFlowSpec, flow_type),
        ),
        (
            "ethtool_rx_flow_spec.h_u",
            offset_of!(EthtoolRxFlowSpec, h_u),
        ),
        (
            "ethtool_rx_flow_spec.h_ext",
            offset_of!(EthtoolRxFlowSpec, h_ext),
        ),
        (
            "ethtool_rx_flow_spec.m_u",
            offset_of!(EthtoolRxFlowSpec, m_u),
        ),
        (
            "ethtool_rx_flow_spec.m_ext",
            offset_of!(EthtoolRxFlowSpec, m_ext),
        ),
        (
            "ethtool_rx_flow_spec.ring_cookie",
            offset_of!(EthtoolRxFlowSpec, ring_cookie),
        ),
        (
            "ethtool_rx_flow_spec.location",
            offset_of!(EthtoolRxFlowSpec, location),
        ),
        ("ethtool_rxnfc.cmd", offset_of!(EthtoolRxnfc, cmd)),
        (
            "ethtool_rxnfc.flow_type",
            offset_of!(EthtoolRxnfc, flow_type),
        ),
        ("ethtool_rxnfc.data", offset_of!(EthtoolRxnfc, data)),
        ("ethtool_rxnfc.fs", offset_of!(EthtoolRxnfc, fs)),
        ("ethtool_rxnfc.rule_cnt", offset_of!(EthtoolRxnfc, rule_cnt)),
        (
            "ethtool_rxnfc.rule_locs",
            offset_of!(EthtoolRxnfcLocs, rule_locs),
        ),
    ];
    for (k, rust) in checks {
        assert_eq!(want(k), *rust as u64, "{k}: C vs Rust");
    }
    // c_ulong is u32 on 32-bit targets, so the cast is not always a no-op.
    #[allow(clippy::unnecessary_cast)]
    let consts: &[(&str, u64)] = &[
        ("SIOCETHTOOL", SIOCETHTOOL as u64),
        ("ETHTOOL_SRXCLSRLINS", ETHTOOL_SRXCLSRLINS.into()),
        ("ETHTOOL_SRXCLSRLDEL", ETHTOOL_SRXCLSRLDEL.into()),
        ("ETHTOOL_GRXCLSRLCNT", ETHTOOL_GRXCLSRLCNT.into()),
        ("ETHTOOL_GRXCLSRLALL", ETHTOOL_GRXCLSRLALL.into()),
        ("TCP_V4_FLOW", TCP_V4_FLOW.into()),
        ("TCP_V6_FLOW", TCP_V6_FLOW.into()),
        ("RX_CLS_LOC_ANY", RX_CLS_LOC_ANY.into()),
        ("RX_CLS_LOC_SPECIAL", RX_CLS_LOC_SPECIAL.into()),
    ];
    for (k, rust) in consts {
        assert_eq!(want(k), *rust, "{k}: C vs Rust");
    }
}

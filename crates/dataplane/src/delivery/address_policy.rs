//! The one address policy every delivery destination passes: at reconcile time (IP
//! literals, resolution overrides, metadata host names), before each attempt (the resolved
//! answers) and on every connection (the HTTP client's DNS resolver, so DNS rebinding
//! cannot slip past). A tenant must not use the operator to reach what its own network
//! position would not: the operator's own ports, the node, cloud metadata services.
//!
//! Owns: the table of refused addresses and the flags that lift a class. Must not: resolve
//! names or know about endpoints.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused; each class has its own flag to allow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    /// 127.0.0.0/8, ::1: the operator's own pod (its ingress, metrics and health ports).
    Loopback,
    /// 0.0.0.0/8, ::: "this host" (Linux connects it to the local host).
    Unspecified,
    /// 169.254.0.0/16, fe80::/10: the node's link, where most metadata services live.
    LinkLocal,
    /// A cloud provider's metadata or host-agent address outside link-local.
    Metadata,
}

impl AddressClass {
    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Loopback => "loopback address",
            AddressClass::Unspecified => "unspecified address",
            AddressClass::LinkLocal => "link-local address",
            AddressClass::Metadata => "cloud metadata address",
        }
    }
}

/// Cloud metadata and host-agent addresses that are not link-local (the link-local ones,
/// such as 169.254.169.254 or 169.254.170.2, are covered by that class).
const METADATA_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud metadata
    Ipv4Addr::new(168, 63, 129, 16),   // Azure WireServer / host agent
    Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud (classic) metadata
];
const METADATA_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), // AWS IMDS over IPv6
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23),  // AWS DNS over IPv6 (Nitro)
];
/// Host names of metadata services (compared lower-case, without a trailing dot).
pub const METADATA_HOSTS: [&str; 3] = [
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
];

/// Which classes are allowed. `Default` refuses every class (production).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Loopback and unspecified addresses (`--allow-loopback`: the local demo, tests).
    pub allow_loopback: bool,
    /// Link-local and cloud metadata addresses (`--allow-link-local`).
    pub allow_link_local: bool,
}

impl AddressPolicy {
    /// Every class allowed.
    pub const ALLOW_ALL: AddressPolicy = AddressPolicy {
        allow_loopback: true,
        allow_link_local: true,
    };

    /// `Err(class)` when `ip` is refused.
    pub fn check(&self, ip: IpAddr) -> Result<(), AddressClass> {
        match classify(ip) {
            Some(c @ (AddressClass::Loopback | AddressClass::Unspecified))
                if !self.allow_loopback =>
            {
                Err(c)
            }
            Some(c @ (AddressClass::LinkLocal | AddressClass::Metadata))
                if !self.allow_link_local =>
            {
                Err(c)
            }
            _ => Ok(()),
        }
    }

    /// `Err` when `host` (a URL host, no brackets) is a metadata service's name.
    pub fn check_host_name(&self, host: &str) -> Result<(), AddressClass> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.allow_link_local && METADATA_HOSTS.contains(&host.as_str()) {
            return Err(AddressClass::Metadata);
        }
        Ok(())
    }
}

/// The class of `ip`, looking through IPv6 forms that carry an IPv4 address (mapped,
/// compatible, NAT64, 6to4), so `::ffff:127.0.0.1` or `64:ff9b::a9fe:a9fe` is judged as
/// the IPv4 address it reaches.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    if METADATA_V4.contains(&ip) {
        Some(AddressClass::Metadata)
    } else if ip.is_loopback() {
        Some(AddressClass::Loopback)
    } else if ip.octets()[0] == 0 {
        Some(AddressClass::Unspecified)
    } else if ip.is_link_local() {
        Some(AddressClass::LinkLocal)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    if METADATA_V6.contains(&ip) {
        Some(AddressClass::Metadata)
    } else if ip.is_loopback() {
        Some(AddressClass::Loopback)
    } else if ip.is_unspecified() {
        Some(AddressClass::Unspecified)
    } else if (ip.segments()[0] & 0xffc0) == 0xfe80 {
        Some(AddressClass::LinkLocal)
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped `::ffff:0:0/96`, IPv4-compatible
/// `::/96` (deprecated, still routed by some stacks), NAT64 `64:ff9b::/96` and
/// `64:ff9b:1::/48` (RFC 8215), 6to4 `2002::/16`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    // `::` and `::1` are IPv6's own unspecified and loopback, not IPv4-compatible forms.
    if s[..6] == [0; 6] && !(ip.is_unspecified() || ip.is_loopback()) {
        return Some(low);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    /// The README's table, one row per entry: address, class (None: allowed).
    const TABLE: &[(&str, Option<AddressClass>)] = &[
        ("127.0.0.1", Some(Loopback)),
        ("127.8.9.10", Some(Loopback)),
        ("::1", Some(Loopback)),
        ("::ffff:127.0.0.1", Some(Loopback)),
        ("64:ff9b::7f00:1", Some(Loopback)),
        ("0.0.0.0", Some(Unspecified)),
        ("0.1.2.3", Some(Unspecified)),
        ("::", Some(Unspecified)),
        ("::ffff:0.0.0.0", Some(Unspecified)),
        ("169.254.1.1", Some(LinkLocal)),
        ("169.254.169.254", Some(LinkLocal)),
        ("169.254.170.2", Some(LinkLocal)),
        ("fe80::1", Some(LinkLocal)),
        ("febf::1", Some(LinkLocal)),
        ("::ffff:169.254.169.254", Some(LinkLocal)),
        ("::169.254.169.254", Some(LinkLocal)),
        ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
        ("64:ff9b:1::a9fe:a9fe", Some(LinkLocal)),
        ("2002:a9fe:a9fe::1", Some(LinkLocal)),
        ("100.100.100.200", Some(Metadata)),
        ("168.63.129.16", Some(Metadata)),
        ("192.0.0.192", Some(Metadata)),
        ("fd00:ec2::254", Some(Metadata)),
        ("fd00:ec2::23", Some(Metadata)),
        ("::ffff:100.100.100.200", Some(Metadata)),
        ("64:ff9b::a83f:8110", Some(Metadata)),
        ("64:ff9b::c000:c0", Some(Metadata)),
        ("10.0.0.1", None),
        ("100.100.100.201", None),
        ("192.0.0.193", None),
        ("8.8.8.8", None),
        ("fd00::1", None),
        ("fd00:ec2::255", None),
        ("2001:db8::1", None),
        ("::ffff:10.0.0.1", None),
        ("64:ff9b::808:808", None),
    ];

    #[test]
    fn every_table_entry_has_its_class() {
        for (ip, want) in TABLE {
            assert_eq!(classify(ip.parse().unwrap()), *want, "{ip}");
        }
    }

    #[test]
    fn default_refuses_every_class_and_each_flag_lifts_its_own() {
        let strict = AddressPolicy::default();
        let loopback = AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        };
        let link_local = AddressPolicy {
            allow_link_local: true,
            ..Default::default()
        };
        for (ip, class) in TABLE {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(strict.check(ip).err(), *class, "{ip}");
            assert!(AddressPolicy::ALLOW_ALL.check(ip).is_ok(), "{ip}");
            let by_loopback = matches!(class, Some(Loopback | Unspecified));
            let by_link_local = matches!(class, Some(LinkLocal | Metadata));
            assert_eq!(loopback.check(ip).is_err(), by_link_local, "{ip}");
            assert_eq!(link_local.check(ip).is_err(), by_loopback, "{ip}");
        }
    }

    #[test]
    fn metadata_host_names_are_refused_in_any_case_and_with_a_trailing_dot() {
        let strict = AddressPolicy::default();
        for host in [
            "metadata.google.internal",
            "METADATA.google.internal.",
            "metadata.goog",
            "metadata.azure.internal",
        ] {
            assert_eq!(strict.check_host_name(host), Err(Metadata), "{host}");
            assert!(AddressPolicy::ALLOW_ALL.check_host_name(host).is_ok());
        }
        assert!(strict.check_host_name("metadata.apps.svc").is_ok());
    }
}

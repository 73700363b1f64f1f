//! Loopback ports for the servers a test (or the benchmark) starts in another process.

/// A free loopback port below the kernel's ephemeral range (32768 and up by default). A
/// port the kernel hands out for port 0 can be taken by any outgoing connection between this
/// check and the server's own bind (a CI run lost etcd that way); one below that range can
/// only be taken by another listener.
pub fn free_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

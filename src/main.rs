use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "webhook-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRD YAML of both kinds.
    Crd,
    /// Serve the provider simulators (Atlas, Atomic, Smallest) for tests and demos.
    Sandbox(webhook_operator::sandbox::SandboxArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", webhook_operator::api::crds_yaml()),
        Command::Sandbox(args) => {
            tokio::runtime::Runtime::new()?.block_on(webhook_operator::sandbox::run(args))?
        }
    }
    Ok(())
}

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", webhook_operator::api::crds_yaml()),
    }
    Ok(())
}

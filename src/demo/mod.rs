//! `ztund demo`: a two-node mesh from network namespaces, real daemons, real traffic.

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
}

/// Runs the demo.
pub fn run(hold: bool) -> Result<(), DemoError> {
    let _ = hold;
    Err(DemoError::Setup("the demo is being built".into()))
}

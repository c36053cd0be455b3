//! `lenet5 info`: the versions of tch and libtorch, threads, devices and the direct engine's
//! instructions.

use anyhow::Result;

use super::RuntimeArgs;

pub fn run(runtime: &RuntimeArgs) -> Result<()> {
    runtime.apply()?;
    println!("{}", lenet5::device::report());
    Ok(())
}

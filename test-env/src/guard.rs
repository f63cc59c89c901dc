//! Test environments that take themselves down when a test ends, also by panicking.

/// Something the test environment brings up: how to remove it, and what would be
/// left if removing failed.
pub trait TearDown {
    fn down(&self) -> anyhow::Result<()>;
    fn leftovers(&self) -> Vec<String>;
}

pub struct Guard<T: TearDown>(pub T);

impl<T: TearDown> Guard<T> {
    /// Takes it down and fails if anything it made is still there.
    pub fn finish(self) -> anyhow::Result<()> {
        self.0.down()?;
        let left = self.0.leftovers();
        anyhow::ensure!(left.is_empty(), "left over after down: {left:?}");
        Ok(())
    }
}

impl<T: TearDown> std::ops::Deref for Guard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: TearDown> Drop for Guard<T> {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("tearing down the test environment: {e:#}");
        }
    }
}

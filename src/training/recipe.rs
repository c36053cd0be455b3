//! Named recipes: `lenet5 train --recipe NAME` and `lenet5.train(recipe=NAME)` start from one
//! and explicit settings override it. The one table, read by the CLI's help, the binding, the
//! model card and (checked by a test) docs/training.md.

use crate::training::optim::OptimizerConfig;
use crate::training::{Evaluate, TrainConfig};

/// A named starting point for a run's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recipe {
    #[default]
    Default,
    Fast,
    Short,
    Long,
}

crate::named_values!(Recipe { Default => "default", Fast => "fast", Short => "short", Long => "long" });

impl Recipe {
    /// What the recipe is for, in a few words.
    pub fn about(self) -> &'static str {
        match self {
            Recipe::Default => "AdamW under one-cycle for 8 epochs",
            Recipe::Fast => "the fewest seconds to 99% test accuracy, read once at the end",
            Recipe::Short => "one-cycle planned for 3 epochs",
            Recipe::Long => "20 epochs with random shifts of up to 2 pixels, like the 1998 paper's distortions",
        }
    }

    /// Its settings: [`TrainConfig::DEFAULT`] with the recipe's changes. Every recipe keeps
    /// to torch.optim's optimizers and schedules, so the libtorch engine runs it as PyTorch does.
    pub const fn config(self) -> TrainConfig {
        let d = TrainConfig::DEFAULT;
        match self {
            Recipe::Default => d,
            // Batches of 256 take half the steps of 128, and so half of each step's fixed
            // work; the higher lr keeps every seed of 1-5 at 99% or more (docs/results).
            Recipe::Fast => TrainConfig {
                recipe: Recipe::Fast,
                epochs: 2,
                batch_size: 256,
                optimizer: OptimizerConfig { lr: 2e-2, ..d.optimizer },
                shift: 1,
                evaluate: Evaluate::End,
                ..d
            },
            Recipe::Short => TrainConfig {
                recipe: Recipe::Short,
                epochs: 3,
                batch_size: 256,
                optimizer: OptimizerConfig { lr: 1.5e-2, ..d.optimizer },
                ..d
            },
            Recipe::Long => TrainConfig { recipe: Recipe::Long, epochs: 20, shift: 2, ..d },
        }
    }

    /// The settings in which the recipe differs from the default one, named as
    /// [`TrainConfig`] serialises them (Python's keywords; the CLI's flags respell them).
    pub fn changes(self) -> Vec<(String, serde_json::Value)> {
        let json = |c: TrainConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => unreachable!("a TrainConfig serialises as an object"),
        };
        let (default, this) = (json(TrainConfig::DEFAULT), json(self.config()));
        this.into_iter().filter(|(k, v)| k != "recipe" && default.get(k) != Some(v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_recipe_names_itself_and_default_is_the_default_config() {
        for &r in Recipe::ALL {
            assert_eq!(r.config().recipe, r);
            r.config().validate().unwrap();
        }
        assert!(Recipe::Default.changes().is_empty());
        assert_eq!(
            serde_json::to_value(Recipe::Default.config()).unwrap(),
            serde_json::to_value(TrainConfig::DEFAULT).unwrap()
        );
    }

    #[test]
    fn changes_name_only_what_differs_from_the_default() {
        let changes = Recipe::Long.changes();
        let names: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["epochs", "shift"]);
        assert_eq!(changes[0].1, serde_json::json!(20));
    }
}

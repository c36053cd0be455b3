//! Settings in the library's own words: a value that cannot be used is named as the library's
//! configs name it (`epochs = 0: must be at least 1`), and each shell may respell the name as
//! its own (the CLI's `--epochs 0: ...`, Python's keyword `epochs`).

use std::fmt;

/// A setting whose value the library cannot use.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSetting {
    /// The setting's name, as the config field (and Python's keyword argument) spells it.
    pub name: &'static str,
    pub value: String,
    pub problem: String,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.name, self.value, self.problem)
    }
}

impl std::error::Error for InvalidSetting {}

/// `name = value: problem`.
pub fn invalid(name: &'static str, value: impl fmt::Display, problem: impl Into<String>) -> InvalidSetting {
    InvalidSetting { name, value: value.to_string(), problem: problem.into() }
}

/// A setting that would get past an error: `every key starts with 'model.': try key_maps = model=`.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggestion {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for Suggestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: try {} = {}", self.reason, self.name, self.value)
    }
}

impl std::error::Error for Suggestion {}

/// Returns an [`InvalidSetting`] error unless `cond` holds: `check!(cond, "epochs", value, "must be ...")`.
#[macro_export]
macro_rules! check_setting {
    ($cond:expr, $name:expr, $value:expr, $($problem:tt)+) => {
        let holds: bool = $cond;
        if !holds {
            return Err($crate::setting::invalid($name, $value, format!($($problem)+)).into());
        }
    };
}

/// A name that is none of an enum's.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownName {
    pub value: String,
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not one of {}", self.value, self.expected.join(", "))
    }
}

impl std::error::Error for UnknownName {}

/// The one spelling of a fieldless enum's values, shared by its serde form, the CLI's values
/// and Python's strings: `NAMES`, `ALL`, `as_str`, `Display`, `FromStr`, and serde's
/// `Serialize` and `Deserialize` as those strings.
#[macro_export]
macro_rules! named_values {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            pub const ALL: &'static [$ty] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::setting::UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    _ => Err($crate::setting::UnknownName { value: s.to_string(), expected: Self::NAMES }),
                }
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::data::DatasetKind;
    use crate::inference::Engine;
    use crate::model::{Arch, Head};
    use crate::training::optim::{Implementation, OptimizerKind};
    use crate::training::schedule::ScheduleKind;

    /// Each value's serde form is its name, and both `FromStr` and serde read it back.
    fn round_trips<T>(all: &[T])
    where
        T: Copy
            + PartialEq
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::str::FromStr
            + std::fmt::Display,
        T::Err: std::fmt::Debug,
    {
        for v in all {
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::Value::from(v.to_string()), "{v:?}");
            assert_eq!(v.to_string().parse::<T>().unwrap(), *v);
            assert_eq!(serde_json::from_value::<T>(serde_json::Value::from(v.to_string())).unwrap(), *v);
        }
    }

    #[test]
    fn every_named_enum_spells_its_values_as_serde_does() {
        round_trips(Arch::ALL);
        round_trips(Head::ALL);
        round_trips(DatasetKind::ALL);
        round_trips(Engine::ALL);
        round_trips(OptimizerKind::ALL);
        round_trips(Implementation::ALL);
        round_trips(ScheduleKind::ALL);
        round_trips(crate::training::recipe::Recipe::ALL);
        round_trips(crate::training::Evaluate::ALL);
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let err = "modren".parse::<Arch>().unwrap_err();
        assert_eq!(err.to_string(), "\"modren\" is not one of modern, classic");
    }

    #[test]
    fn an_invalid_setting_names_the_setting_and_its_value() {
        let e = super::invalid("epochs", 0, "must be at least 1");
        assert_eq!(e.to_string(), "epochs = 0: must be at least 1");
    }
}

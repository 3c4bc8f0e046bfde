//! Byte quantities written the Kubernetes way (`10Gi`, `500M`, `1e9`): the
//! [`VolumeSize`] of a MirroredVolume and the [`RateLimit`] of its resync.
//!
//! On the wire both stay the string the user wrote, so `kubectl get` shows
//! `10Gi` and not `10737418240`. The API server checks them with CEL
//! (`isQuantity`, see `volume.rs`); Rust code turns them into bytes with
//! [`parse_bytes`], which follows the Kubernetes quantity grammar but accepts
//! only whole, non-negative byte counts that fit a `u64`. Deserialization is
//! deliberately lenient (any string): an object the server accepted must
//! never make a whole watch fail; the reconciler reports a bad value instead.

use std::{borrow::Cow, fmt};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Longest quantity string accepted; bounds the cost of the CEL rules.
pub const MAX_QUANTITY_LEN: usize = 64;

/// Why a quantity string is not a usable number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{value:?} is not a Kubernetes quantity (examples: 10Gi, 500M, 1e9)")]
    Syntax { value: String },
    #[error("{value:?} is negative")]
    Negative { value: String },
    #[error("{value:?} is not a whole number of bytes")]
    NotWholeBytes { value: String },
    #[error("{value:?} is too large (more than 2^64-1 bytes)")]
    TooLarge { value: String },
    #[error("{value:?} is zero; give a size greater than zero")]
    Zero { value: String },
}

/// Splits the suffix off a quantity: returns (number part, power of 1024,
/// power of ten).
fn split_suffix(value: &str) -> Option<(&str, u32, i32)> {
    const BINARY: [(&str, u32); 6] = [
        ("Ki", 1),
        ("Mi", 2),
        ("Gi", 3),
        ("Ti", 4),
        ("Pi", 5),
        ("Ei", 6),
    ];
    for (suffix, power) in BINARY {
        if let Some(number) = value.strip_suffix(suffix) {
            return Some((number, power, 0));
        }
    }
    // A decimal exponent: `e`/`E` followed by a signed integer. Checked before
    // the SI letters because `E` alone is also exa.
    if let Some(pos) = value.find(['e', 'E']) {
        let exponent = &value[pos + 1..];
        let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let exp: i32 = exponent.parse().ok()?;
            return Some((&value[..pos], 0, exp));
        }
    }
    const DECIMAL: [(&str, i32); 9] = [
        ("n", -9),
        ("u", -6),
        ("m", -3),
        ("k", 3),
        ("M", 6),
        ("G", 9),
        ("T", 12),
        ("P", 15),
        ("E", 18),
    ];
    for (suffix, exp) in DECIMAL {
        if let Some(number) = value.strip_suffix(suffix) {
            return Some((number, 0, exp));
        }
    }
    Some((value, 0, 0))
}

/// Parses a Kubernetes quantity into a whole number of bytes.
pub fn parse_bytes(value: &str) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax {
        value: value.to_owned(),
    };
    let (number, power_1024, exp10) = split_suffix(value).ok_or_else(syntax)?;
    let (negative, number) = match number.as_bytes().first() {
        Some(b'-') => (true, &number[1..]),
        Some(b'+') => (false, &number[1..]),
        _ => (false, number),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return Err(syntax());
    }
    let too_large = || QuantityError::TooLarge {
        value: value.to_owned(),
    };
    // Leading zeros carry no value; dropping them keeps the u128 in range for
    // inputs such as "000000000000000000000000000000000000001".
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| too_large())?
    };
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative {
            value: value.to_owned(),
        });
    }
    let fraction_len = i32::try_from(fraction.len()).map_err(|_| syntax())?;
    let exp10 = exp10 - fraction_len;
    let mut bytes = mantissa
        .checked_mul(1024u128.pow(power_1024))
        .ok_or_else(too_large)?;
    if exp10 >= 0 {
        let scale = 10u128
            .checked_pow(exp10.unsigned_abs())
            .ok_or_else(too_large)?;
        if bytes != 0 {
            bytes = bytes.checked_mul(scale).ok_or_else(too_large)?;
        }
    } else if bytes != 0 {
        let not_whole = || QuantityError::NotWholeBytes {
            value: value.to_owned(),
        };
        let scale = 10u128
            .checked_pow(exp10.unsigned_abs())
            .ok_or_else(not_whole)?;
        if !bytes.is_multiple_of(scale) {
            return Err(not_whole());
        }
        bytes /= scale;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

fn quantity_schema() -> Schema {
    json_schema!({ "type": "string", "minLength": 1, "maxLength": MAX_QUANTITY_LEN })
}

macro_rules! quantity_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks that `value` is a positive whole number of bytes.
            pub fn new(value: impl Into<String>) -> Result<Self, QuantityError> {
                let value = value.into();
                match parse_bytes(&value)? {
                    0 => Err(QuantityError::Zero { value }),
                    _ => Ok(Self(value)),
                }
            }

            /// The exact quantity for `bytes`, with the largest binary suffix
            /// that divides it (`10Gi`, `1536Ki`, `1000`).
            pub fn from_bytes(bytes: u64) -> Result<Self, QuantityError> {
                Self::new(format_bytes(bytes))
            }

            /// The quantity as the user wrote it.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The number of bytes, or why the stored string is not one.
            pub fn bytes(&self) -> Result<u64, QuantityError> {
                parse_bytes(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn inline_schema() -> bool {
                true
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                quantity_schema()
            }
        }
    };
}

quantity_newtype!(
    /// The size of a mirrored volume, in bytes.
    VolumeSize
);
quantity_newtype!(
    /// A resync bandwidth limit, in bytes per second.
    RateLimit
);

/// Formats `bytes` with the largest binary suffix that divides it exactly.
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".to_owned();
    }
    let mut value = bytes;
    let mut suffix = "";
    for candidate in SUFFIXES {
        if !value.is_multiple_of(1024) {
            break;
        }
        value /= 1024;
        suffix = candidate;
    }
    format!("{value}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_exponent_forms() {
        let cases = [
            ("1", 1),
            ("10Gi", 10 << 30),
            ("1.5Ki", 1536),
            ("500M", 500_000_000),
            ("1e9", 1_000_000_000),
            ("1E3", 1000),
            ("2k", 2000),
            ("1E", 1_000_000_000_000_000_000),
            ("+4Mi", 4 << 20),
            (".5Ki", 512),
            ("3.", 3),
            ("1000m", 1),
            ("0", 0),
            ("-0", 0),
            ("120e-1", 12),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_what_is_not_whole_bytes() {
        assert!(matches!(
            parse_bytes("1500m"),
            Err(QuantityError::NotWholeBytes { .. })
        ));
        assert!(matches!(
            parse_bytes("0.5"),
            Err(QuantityError::NotWholeBytes { .. })
        ));
        assert!(matches!(
            parse_bytes("1n"),
            Err(QuantityError::NotWholeBytes { .. })
        ));
    }

    #[test]
    fn refuses_garbage_negative_and_huge() {
        for bad in ["", "Gi", "ten", "1GB", "1 Gi", "1..2", "e3", "1Gi2", "."] {
            assert!(
                matches!(parse_bytes(bad), Err(QuantityError::Syntax { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::Negative { .. })
        ));
        assert!(matches!(
            parse_bytes("16Ei"),
            Err(QuantityError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_bytes("1e40"),
            Err(QuantityError::TooLarge { .. })
        ));
    }

    #[test]
    fn volume_size_must_be_positive() {
        assert!(matches!(
            VolumeSize::new("0Gi"),
            Err(QuantityError::Zero { .. })
        ));
        assert_eq!(VolumeSize::new("1Gi").and_then(|s| s.bytes()), Ok(1 << 30));
    }

    #[test]
    fn from_bytes_picks_the_largest_exact_suffix() {
        assert_eq!(format_bytes(10 << 30), "10Gi");
        assert_eq!(format_bytes(1536 * 1024), "1536Ki");
        assert_eq!(format_bytes(1000), "1000");
        let size = VolumeSize::from_bytes(3 << 20).expect("positive");
        assert_eq!(size.as_str(), "3Mi");
        assert_eq!(size.bytes(), Ok(3 << 20));
    }

    #[test]
    fn serializes_as_the_string_the_user_wrote() {
        let size = VolumeSize::new("10Gi").expect("valid");
        assert_eq!(
            serde_json::to_string(&size).expect("serializes"),
            "\"10Gi\""
        );
        let lenient: VolumeSize = serde_json::from_str("\"nonsense\"").expect("lenient");
        assert!(lenient.bytes().is_err());
    }
}

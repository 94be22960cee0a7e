//! Sealed JSON: a readable JSON document that carries the SHA-256 of its own canonical form in a
//! `"checksum"` field, so metadata read back is verified like every other object.
//!
//! Canonical form: the document without `"checksum"`, serialised compactly with keys sorted
//! (serde_json's default map is ordered).

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("checksum missing")]
    Missing,
    #[error("only a JSON object can be sealed")]
    NotAnObject,
    #[error("checksum mismatch: the document was altered or damaged")]
    Mismatch,
}

fn digest(v: &serde_json::Value) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(v.to_string().as_bytes()))
    )
}

pub fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>, SealError> {
    let mut v = serde_json::to_value(value)?;
    let sum = digest(&v);
    let serde_json::Value::Object(m) = &mut v else {
        return Err(SealError::NotAnObject);
    };
    m.insert("checksum".into(), serde_json::Value::String(sum));
    let mut out = serde_json::to_vec_pretty(&v)?;
    out.push(b'\n');
    Ok(out)
}

pub fn open<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SealError> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes)?;
    let sum = match &mut v {
        serde_json::Value::Object(m) => m.remove("checksum"),
        _ => None,
    };
    let Some(serde_json::Value::String(sum)) = sum else {
        return Err(SealError::Missing);
    };
    if sum != digest(&v) {
        return Err(SealError::Mismatch);
    }
    Ok(serde_json::from_value(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Doc {
        name: String,
        n: u64,
    }

    #[test]
    fn floats_survive_the_round_trip() {
        // Durations in drill results: every float must re-serialise to the same text, or the
        // checksum fails on read (serde_json's `float_roundtrip`).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x % 100_000_000) as f64 / 1e6 + (x >> 40) as f64 * 1e-9;
            let sealed = seal(&serde_json::json!({ "seconds": v })).unwrap();
            let back: serde_json::Value = open(&sealed).unwrap();
            assert_eq!(back["seconds"].as_f64(), Some(v));
        }
    }

    #[test]
    fn seal_and_open() {
        let d = Doc {
            name: "x".into(),
            n: u64::MAX,
        };
        let b = seal(&d).unwrap();
        assert_eq!(open::<Doc>(&b).unwrap(), d);
        let tampered = String::from_utf8(b.clone())
            .unwrap()
            .replace("\"x\"", "\"y\"");
        assert!(matches!(
            open::<Doc>(tampered.as_bytes()),
            Err(SealError::Mismatch)
        ));
        assert!(matches!(
            open::<Doc>(b"{\"name\":\"x\",\"n\":1}"),
            Err(SealError::Missing)
        ));
        assert!(open::<Doc>(&b[..b.len() / 2]).is_err());
    }
}

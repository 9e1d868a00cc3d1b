"""Signing an adapter's manifest with a user's key, and checking such a signature: who wrote the
folder, where the manifest (`io.manifest`) only says that its files belong together.

Ed25519 through `cryptography` (the `splice[audit]` extra), keys in PEM files: no crypto is
written here. The signature, `splice_manifest.sig`, covers the manifest's bytes, and through its
hashes every file and tensor of the folder.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

from splice.core.errors import AdapterFileError, OutputExistsError, SpliceError
from splice.io.adapter_files import check_folder
from splice.io.files import write_bytes
from splice.io.manifest import MANIFEST_NAME, SIGNATURE_NAME, verify_manifest

SignatureVerdict = Literal["verified", "invalid", "unsigned", "not checked"]


def generate_key(private_path: str | Path, public_path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair as PEM files (the private one unencrypted, readable by its owner only)."""
    ed25519, serialization = _crypto()
    paths = Path(private_path), Path(public_path)
    if paths[0].resolve() == paths[1].resolve():
        raise SpliceError(f"the private and the public key would both be written to {paths[0]}; "
                          "give them different paths (the public one: a .pub next to the private one)")
    for path in paths:
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} exists; choose another path or overwrite it (--force)")
        path.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_bytes(paths[0], private, mode=0o600)
    write_bytes(paths[1], public)
    return paths


def sign_tree(folder: str | Path, private_key: str | Path, *, password: bytes | None = None,
              overwrite: bool = False) -> list[Path]:
    """Sign every manifest of `folder`: its own and, in a folder of several adapters (PEFT's
    layout), each subfolder's; all checked before any is written."""
    folder = Path(folder)
    check_folder(folder, "adapter folder")
    folders = [sub for sub in sorted(folder.iterdir()) if sub.is_dir() and (sub / MANIFEST_NAME).is_file()]
    folders = ([folder] if (folder / MANIFEST_NAME).is_file() or not folders else []) + folders
    for where in folders:
        _check_signable(where, overwrite)
    return [sign_folder(where, private_key, password=password, overwrite=overwrite) for where in folders]


def sign_folder(folder: str | Path, private_key: str | Path, *, password: bytes | None = None,
                overwrite: bool = False) -> Path:
    """Sign `folder`'s manifest with the Ed25519 private key in PEM file `private_key`; a folder
    whose files no longer match its manifest is refused (a signature vouches for the files)."""
    folder = Path(folder)
    _check_signable(folder, overwrite)
    manifest = _manifest_bytes(folder)
    target = folder / SIGNATURE_NAME
    key = _load_private(Path(private_key), password)
    write_bytes(target, base64.b64encode(key.sign(manifest)) + b"\n")
    return target


def verify_signature(folder: str | Path, public_key: str | Path | None) -> tuple[SignatureVerdict, str]:
    """Whether `folder`'s manifest carries a valid signature by the key in PEM file `public_key`."""
    folder = Path(folder)
    signature_path = folder / SIGNATURE_NAME
    if not signature_path.is_file():
        return "unsigned", f"{folder} has no {SIGNATURE_NAME}"
    if public_key is None:
        return "not checked", f"{folder} is signed, but no public key was given to check it"
    from cryptography.exceptions import InvalidSignature

    key = _load_public(Path(public_key))
    try:
        signature = base64.b64decode(signature_path.read_bytes().strip(), validate=True)
        key.verify(signature, _manifest_bytes(folder))
    except (InvalidSignature, ValueError):
        return "invalid", f"{signature_path} is not a signature of {folder / MANIFEST_NAME} by the key in {public_key}"
    return "verified", f"{folder / MANIFEST_NAME} is signed by the key in {public_key}"


def _check_signable(folder: Path, overwrite: bool) -> None:
    target = folder / SIGNATURE_NAME
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists (the folder is signed already); overwrite it to sign again (--force)")
    check = verify_manifest(folder)
    if not check.has_manifest:
        raise AdapterFileError(f"{folder} has no readable {MANIFEST_NAME} to sign ("
                               f"{'; '.join(check.tampered) or 'save it with splice.save first'})")
    if check.tampered:
        raise AdapterFileError(f"refusing to sign {folder}: its files differ from its manifest: "
                               + "; ".join(check.tampered))


def _manifest_bytes(folder: Path) -> bytes:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise AdapterFileError(f"{folder} has no {MANIFEST_NAME} to sign or check; save it with splice.save first")
    return path.read_bytes()


def _check_key_file(path: Path, kind: str) -> None:
    if not path.is_file():
        raise SpliceError(f"{kind} key file {path} does not exist" if not path.exists() else
                          f"{kind} key {path} is not a file")


def _load_private(path: Path, password: bytes | None) -> Any:
    ed25519, serialization = _crypto()
    _check_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=password)
    except (OSError, ValueError, TypeError) as err:
        raise SpliceError(f"{path}: not a readable PEM private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SpliceError(f"{path}: a {type(key).__name__}; splice signs with Ed25519 keys (splice keygen)")
    return key


def _load_public(path: Path) -> Any:
    ed25519, serialization = _crypto()
    _check_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise SpliceError(f"{path}: not a readable PEM public key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SpliceError(f"{path}: a {type(key).__name__}; splice checks Ed25519 signatures")
    return key


def _crypto() -> tuple[Any, Any]:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SpliceError("signing needs the `cryptography` package: pip install 'splice[audit]'") from None
    return ed25519, serialization

"""Errors that end a command with exit code 2 and one line naming the file and field."""


class InputError(Exception):
    """Bad user input: a spec, a data file, or a store. The CLI prints `str(e)` and exits 2."""

    def __init__(self, where: str, what: str):
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}")


# errno values that mean "the machine refused the I/O", not "the program is wrong"
IO_ERRNOS = {"EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "EIO", "EMFILE", "ENFILE", "ENAMETOOLONG", "ENOENT",
             "ENOTDIR", "EISDIR", "EEXIST", "ENOTEMPTY", "EXDEV", "EBUSY", "ETXTBSY", "EFBIG"}


def io_error_line(e: OSError) -> str | None:
    """One line for an I/O failure (`path: permission denied`), or None when `e` is not one."""
    import errno
    name = errno.errorcode.get(e.errno or -1)
    if name not in IO_ERRNOS:
        return None
    what = (e.strerror or name).lower()
    paths = [str(f) for f in (e.filename, getattr(e, "filename2", None)) if f]
    return f"{' -> '.join(paths) or 'I/O'}: {what}"

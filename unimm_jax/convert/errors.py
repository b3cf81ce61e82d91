"""The one exception type of conversion and checkpoint loading."""


class ConversionError(ValueError):
  """A checkpoint could not be converted or restored; the message names the file, key and shapes."""

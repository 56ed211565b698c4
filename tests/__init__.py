import pytest

# Helpers that assert, so that a failure says what it saw.
pytest.register_assert_rewrite("tests.support")

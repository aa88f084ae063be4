"""What the tests share: tiny models and corpora, config writers and runners, fakes of devices.

Test modules import from here, never from each other; conftest.py holds fixtures only.
"""

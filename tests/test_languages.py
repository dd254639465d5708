import pytest

from apollo_ray import languages as L


def test_fifty_languages_seven_families_twelve_majors():
    assert len(L.all_codes()) == 50 and len(set(L.all_codes())) == 50
    assert len(L.FAMILIES) == 7
    assert sorted(L.MAJORS) == sorted(["ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru", "zh"])
    assert len(L.minors()) == 38 and not set(L.minors()) & set(L.MAJORS)


def test_families_as_the_paper():
    assert L.family_members("Sino-Tibetan") == ("zh",)
    assert set(L.family_members("Altaic")) == {"ko", "ja", "mn"}
    assert set(L.family_members("Australasian")) == {"th", "vi", "lo"}
    assert set(L.family_members("Austronesian")) == {"mg", "ceb", "su", "ilo", "doi"}
    assert set(L.family_members("Afro-Asiatic")) == {"ar", "ckb", "mt", "he"}
    assert set(L.family_members("Niger-Congo")) == {"ln", "bm", "sw", "nso", "ig", "rw", "ha"}
    assert len(L.family_members("Indo-European")) == 27
    assert L.get("hi").family == "Indo-European" and L.get("ar").family_id == 5


def test_alias_and_errors():
    assert L.canonical("ne") == "mn" and L.canonical("EN") == "en"
    with pytest.raises(L.UnknownLanguage, match="'xx'"):
        L.canonical("xx")


def test_expert_maps():
    fam = L.expert_map("family")
    assert len(fam) == 50 and set(fam.values()) == set(range(7)) and fam["zh"] == 0 and fam["sw"] == 6
    lang = L.expert_map("language")
    assert lang == {c: i for i, c in enumerate(L.MAJORS)}
    assert L.num_experts("language", ["en", "zh", "fr"]) == 3
    assert L.expert_names("family")[4] == "Indo-European"
    with pytest.raises(ValueError, match="duplicate"):
        L.expert_map("language", ["en", "en"])

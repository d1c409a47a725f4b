"""Synthetic restaurant reviews (mostly Korean, some English, digits, emoji) with
long-tailed lengths, for the demo and tests. Deterministic for a given seed.

The phrase lists and review shapes are batchgate's own (the same generator as
benchmarks/make_sample_reviews.py writes the bundled sample file with one_review()).
"""
from __future__ import annotations

import json
import random
from typing import Dict, Iterator, List

KO_OPENERS = [
    "점심에 동료들이랑 다녀왔어요.", "주말 저녁에 가족 외식으로 방문했습니다.", "친구 추천으로 처음 가봤는데요",
    "퇴근하고 혼밥하러 들렀어요.", "배달로 시켜 먹었습니다.", "웨이팅이 길다고 해서 오픈 시간 맞춰 갔어요.",
    "부모님 생신이라 예약하고 갔습니다.", "데이트 코스로 괜찮을 것 같아서 가봤어요.", "회식 장소로 다녀왔어요.",
    "근처 지나가다가 우연히 들어갔는데", "두 번째 방문이에요.", "단골집입니다 ㅎㅎ",
]
KO_FOOD = [
    "김치찌개가 진하고 칼칼해서 밥 한 공기 뚝딱했어요.", "삼겹살이 두툼하고 육즙이 살아 있었어요.",
    "냉면 육수가 살짝 달았지만 면은 쫄깃했습니다.", "파스타는 소스가 너무 짰어요.",
    "떡볶이 양이 많아서 셋이 먹어도 남았어요.", "반찬이 정갈하고 리필도 잘 해주셨어요.",
    "국물이 미지근해서 아쉬웠습니다.", "돈까스 튀김옷이 바삭바삭하고 안은 촉촉했어요.",
    "초밥 밥알이 좀 뭉개져 있었어요.", "갈비탕에 고기가 넉넉하게 들어 있었습니다.",
    "디저트로 나온 빙수가 생각보다 맛있었어요.", "짬뽕이 불맛 제대로였어요!", "비빔밥 나물이 신선했어요.",
    "치킨은 양념보다 후라이드가 훨씬 나아요.", "커피는 산미가 강한 편이에요.", "해물파전이 겉바속촉 그 자체",
]
KO_SERVICE = [
    "직원분들이 친절하셨어요.", "주문하고 음식 나오기까지 40분 넘게 걸렸어요.", "사장님이 서비스로 음료를 주셨어요.",
    "테이블 간격이 좁아서 좀 시끄러웠습니다.", "화장실이 깨끗해서 좋았어요.", "주차는 2대 정도만 가능해요.",
    "가격 대비 양이 적은 편입니다.", "키오스크 주문이라 편했어요.", "예약했는데도 15분 기다렸어요.",
    "아이 의자도 준비되어 있어서 편했어요.", "창가 자리 뷰가 정말 좋아요.", "계산할 때 카드 결제가 안 돼서 당황했어요.",
]
KO_CLOSERS = [
    "재방문 의사 있습니다!", "다음에는 다른 메뉴도 먹어볼게요.", "굳이 다시 가지는 않을 것 같아요.",
    "강력 추천합니다 👍", "별 다섯 개 드려요 ⭐⭐⭐⭐⭐", "그냥 무난했어요.", "가성비 최고 ㅋㅋㅋ", "또 올게요~",
    "전체적으로 만족스러웠습니다.", "기대가 커서 그런지 좀 실망이에요 ㅠㅠ",
]
EN_SENTENCES = [
    "Great food, friendly staff.", "The portions were huge and the price was fair.",
    "Service was slow but the kimchi stew made up for it.", "Too salty for my taste.",
    "Best Korean BBQ I've had in Seoul!", "Would come back for the cold noodles.",
    "Waited 30 minutes for a table on a Friday night.", "The menu has English descriptions, which helped a lot.",
    "Not worth the hype, honestly.", "Clean place, fast service, solid fried chicken.",
]
EMOJI = ["😋", "👍", "🔥", "😍", "😢", "🍜", "🍗", "🍺", "❤️", "👨‍👩‍👧", "⭐", "🥲", "✨", "😂"]
NOISE = ["ㅋㅋ", "ㅎㅎ", "ㅠㅠ", "!!", "...", "~~", "^^", "(강추)", "#맛집", "#존맛", "10/10", "★★★★☆"]


def _price(rng: random.Random) -> str:
    n = rng.choice([8000, 9500, 12000, 15000, 23000, 35000, 48000])
    return rng.choice([f"1인분에 {n:,}원이에요.", f"{n}원 냈어요.", f"둘이서 {2 * n:,}원 나왔어요.", f"${n // 1300} per person."])


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        s = rng.choice(KO_FOOD)
    elif r < 0.78:
        s = rng.choice(KO_SERVICE)
    elif r < 0.88:
        s = rng.choice(EN_SENTENCES)
    else:
        s = _price(rng)
    if rng.random() < 0.15:
        # Emoji both after a space and glued on, sometimes repeated, as people type them.
        s += rng.choice(["", " "]) + rng.choice(EMOJI) * rng.choice([1, 1, 1, 2, 3])
    if rng.random() < 0.12:
        s += " " + rng.choice(NOISE)
    return s


def one_review(rng: random.Random) -> str:
    # Long-tailed length: most reviews 1-4 sentences, a few very long ones.
    n = min(80, max(1, int(rng.lognormvariate(0.9, 0.9))))
    if rng.random() < 0.015:
        n = rng.randint(35, 70)
    if rng.random() < 0.12:  # an English-only review
        body = [rng.choice(EN_SENTENCES) for _ in range(n)]
        if rng.random() < 0.4:
            body.append(rng.choice(EMOJI))
        return " ".join(body)
    parts = []
    if rng.random() < 0.6:
        parts.append(rng.choice(KO_OPENERS))
    parts.extend(_sentence(rng) for _ in range(n))
    if rng.random() < 0.7:
        parts.append(rng.choice(KO_CLOSERS))
    sep = "\n" if n > 8 and rng.random() < 0.5 else " "
    text = sep.join(parts)
    if len(text) < 12 and rng.random() < 0.5:
        text = rng.choice(["맛있어요", "별로", "굿굿 👍", "또 갈게요!!", "so-so"])
    return text


def generate_corpus(n_restaurants: int = 100, reviews_per_restaurant: int = 500,
                    seed: int = 20261125) -> Iterator[Dict[str, str]]:
    """``reviews_per_restaurant`` reviews for each of ``n_restaurants`` restaurants,
    as records {restaurant_id, review_id, text}, restaurant by restaurant."""
    if n_restaurants < 1 or reviews_per_restaurant < 1:
        raise ValueError("n_restaurants and reviews_per_restaurant must be >= 1")
    rng = random.Random(seed)
    width = max(3, len(str(n_restaurants)))
    for r in range(1, n_restaurants + 1):
        rid = f"r{r:0{width}d}"
        for i in range(1, reviews_per_restaurant + 1):
            yield {"restaurant_id": rid, "review_id": f"{rid}-{i:05d}", "text": one_review(rng)}


def write_corpus(path: str, n_restaurants: int = 100, reviews_per_restaurant: int = 500,
                 seed: int = 20261125) -> int:
    """Write the corpus as JSONL; return the number of reviews written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in generate_corpus(n_restaurants, reviews_per_restaurant, seed):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def corpus_texts(n_restaurants: int, reviews_per_restaurant: int,
                 seed: int = 20261125) -> Dict[str, List[str]]:
    """The corpus in memory: texts per restaurant id."""
    out: Dict[str, List[str]] = {}
    for rec in generate_corpus(n_restaurants, reviews_per_restaurant, seed):
        out.setdefault(rec["restaurant_id"], []).append(rec["text"])
    return out
